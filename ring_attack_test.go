//go:build linux

package subproc

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func init() {
	// ring-attacker is a module that attacks the memory it shares with the
	// parent, as only a hostile module would: it finds the sharedMapping in
	// /proc/self/maps, tries to shrink the file under it, and overwrites
	// all of it, slot states included, with random bytes and zeros.
	Register("ring-attacker", func(ctx context.Context, env *Env) (http.Handler, error) {
		var (
			mu   sync.Mutex
			stop chan struct{}
		)
		mux := http.NewServeMux()
		mux.HandleFunc("GET /truncate", func(w http.ResponseWriter, r *http.Request) {
			maps, err := sharedMappings()
			if err != nil || len(maps) == 0 {
				http.Error(w, fmt.Sprintf("no shared sharedMapping: %v", err), http.StatusInternalServerError)
				return
			}
			for _, m := range maps {
				f, err := os.OpenFile("/proc/self/map_files/"+m.name, os.O_RDWR, 0)
				if err == nil {
					err = f.Truncate(0)
					f.Close()
				}
				fmt.Fprintf(w, "%s: %v\n", m.name, err)
			}
		})
		mux.HandleFunc("POST /scribble", func(w http.ResponseWriter, r *http.Request) {
			maps, err := sharedMappings()
			if err != nil || len(maps) == 0 {
				http.Error(w, fmt.Sprintf("no shared sharedMapping: %v", err), http.StatusInternalServerError)
				return
			}
			mem, err := os.OpenFile("/proc/self/mem", os.O_RDWR, 0)
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			mu.Lock()
			stop = make(chan struct{})
			done := stop
			mu.Unlock()
			go func() {
				defer mem.Close()
				junk := make([]byte, 64<<10)
				for pass := 0; ; pass++ {
					// Random bytes, then zeros: every slot marked free,
					// the ones the parent holds included.
					for _, m := range maps {
						for off := m.start; off < m.end; off += uint64(len(junk)) {
							select {
							case <-done:
								return
							default:
							}
							if pass%2 == 0 {
								rand.Read(junk)
							} else {
								clear(junk)
							}
							mem.WriteAt(junk[:min(uint64(len(junk)), m.end-off)], int64(off))
						}
					}
				}
			}()
		})
		mux.HandleFunc("POST /stop", func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			defer mu.Unlock()
			if stop != nil {
				close(stop)
				stop = nil
			}
		})
		mux.HandleFunc("GET /big", bigHandler)
		mux.HandleFunc("POST /upload", func(w http.ResponseWriter, r *http.Request) {
			n, _ := io.Copy(io.Discard, r.Body)
			fmt.Fprint(w, n)
		})
		mux.HandleFunc("GET /tunnel", func(w http.ResponseWriter, r *http.Request) {
			// Hijacks the connection, writes a 101 and then ?bytes= of
			// ringPattern in chunks, and closes it.
			n, _ := strconv.Atoi(r.URL.Query().Get("bytes"))
			conn, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			defer conn.Close()
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: bytes\r\n\r\n")
			brw.Flush()
			p := ringPattern(chunkSize)
			for off := 0; off < n; off += len(p) {
				if _, err := conn.Write(p[:min(len(p), n-off)]); err != nil {
					return
				}
			}
		})
		return mux, nil
	})
}

type sharedMapping struct {
	name       string // as in /proc/self/map_files
	start, end uint64
	offset     uint64 // in the shared file
}

// sharedMappings returns this process's mappings of the memory it shares
// with the parent.
func sharedMappings() ([]sharedMapping, error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var maps []sharedMapping
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || !strings.Contains(sc.Text(), "subproc-shared") {
			continue
		}
		lo, hi, _ := strings.Cut(fields[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		offset, err3 := strconv.ParseUint(fields[2], 16, 64)
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, err
		}
		maps = append(maps, sharedMapping{name: fields[0], start: start, end: end, offset: offset})
	}
	return maps, sc.Err()
}

// A module that shrinks the memory it shares with the parent, or
// overwrites all of it while bodies go through it both ways, cannot make
// the parent fault, hang or lose track: the file cannot shrink; responses
// come out whole, or fail, and the parent, restarting the child if it broke
// the protocol, goes on serving.
func TestRingAttacker(t *testing.T) {
	h := startModule(t, "ring-attacker", Options{})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)

	_, body := fetch(t, srv.URL+"/truncate")
	t.Logf("shrinking the shared memory:\n%s", body)
	if strings.Contains(body, "permission denied") {
		t.Log("map_files is closed to this user: the shrink is not tried")
	} else {
		for _, line := range strings.Split(strings.TrimSpace(body), "\n") {
			require.True(t, strings.HasSuffix(line, syscall.EPERM.Error()), "shrinking the shared memory: %s", line)
		}
	}

	res, err := http.Post(srv.URL+"/scribble", "", nil)
	require.NoError(t, err)
	res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode)

	const size = 8 << 20
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 5 {
				res, err := http.Get(srv.URL + "/big?bytes=" + strconv.Itoa(size))
				if err != nil {
					continue
				}
				n, err := io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if err == nil && res.StatusCode == http.StatusOK && n != size {
					t.Errorf("a complete response of %d bytes, want %d", n, size)
				}
			}
		})
		wg.Go(func() {
			for range 5 {
				res, err := http.Post(srv.URL+"/upload", "application/octet-stream", io.LimitReader(zeros{}, size))
				if err != nil {
					continue
				}
				got, err := io.ReadAll(res.Body)
				res.Body.Close()
				if err == nil && res.StatusCode == http.StatusOK && string(got) != strconv.Itoa(size) {
					t.Errorf("the module read %s bytes of an upload of %d", got, size)
				}
			}
		})
	}
	wg.Wait()

	// The attack stops with the child that made it, or at /stop.
	if res, err := http.Post(srv.URL+"/stop", "", nil); err == nil {
		res.Body.Close()
	}
	waitFor(t, 30*time.Second, "a child that serves again", func() bool {
		res, err := http.Get(srv.URL + "/big?bytes=" + strconv.Itoa(size))
		if err != nil {
			return false
		}
		defer res.Body.Close()
		n, err := io.Copy(io.Discard, res.Body)
		return err == nil && n == size
	})
}

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
