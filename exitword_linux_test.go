package subproc

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func init() {
	// exitword is a module that can lie in its exit word (see
	// armExitWord), as only a hostile module would.
	Register("exitword", func(ctx context.Context, env *Env) (http.Handler, error) {
		mux := http.NewServeMux()
		mux.HandleFunc("GET /pid", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, os.Getpid())
		})
		// /set?v= stores v in the exit word and wakes its waiter.
		mux.HandleFunc("GET /set", func(w http.ResponseWriter, r *http.Request) {
			v, err := strconv.ParseUint(r.URL.Query().Get("v"), 0, 32)
			if err == nil {
				err = exitWordSet(uint32(v))
			}
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
			}
		})
		// /requeue moves the exit word's waiters to a futex of this
		// child's own, which nothing will wake, and answers how many it
		// moved.
		mux.HandleFunc("GET /requeue", func(w http.ResponseWriter, r *http.Request) {
			addr, err := exitWordAddr()
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			const futexRequeue = 3
			n, _, errno := syscall.Syscall6(syscall.SYS_FUTEX, addr, futexRequeue, 0, math.MaxInt32, uintptr(unsafe.Pointer(&exitWordTrap)), 0)
			if errno != 0 {
				http.Error(w, errno.Error(), http.StatusInternalServerError)
				return
			}
			fmt.Fprint(w, n)
		})
		return mux, nil
	})
}

// exitWordTrap is the futex to which /requeue moves the exit word's waiters.
var exitWordTrap uint32

// exitWordSet stores v in this child's exit word, as a module could, by
// writing to its own memory, and wakes the word's waiter.
func exitWordSet(v uint32) error {
	addr, err := exitWordAddr()
	if err != nil {
		return err
	}
	mem, err := os.OpenFile("/proc/self/mem", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer mem.Close()
	if _, err := mem.WriteAt(binary.NativeEndian.AppendUint32(nil, v), int64(addr)); err != nil {
		return err
	}
	_, _, errno := syscall.Syscall6(syscall.SYS_FUTEX, addr, futexWake, 1, 0, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// exitWordAddr finds this child's exit word: 8 bytes into its mapping of
// the shared file's first page.
func exitWordAddr() (uintptr, error) {
	maps, err := sharedMappings()
	if err != nil {
		return 0, err
	}
	for _, m := range maps {
		if m.offset == 0 && m.end-m.start == uint64(os.Getpagesize()) {
			return uintptr(m.start + 8), nil
		}
	}
	return 0, fmt.Errorf("no mapping of the shared page among %v", maps)
}

// startExitWord starts module exitword and returns its server and child,
// whose exit word is armed and watched.
func startExitWord(t *testing.T, opts Options) (*Handle, string, *child) {
	t.Helper()
	h := startModule(t, "exitword", opts)
	srv := serve(t, h)
	c := firstChild(h)
	require.NotNil(t, c.exitWatch, "the parent does not watch the child's exit word")
	return h, srv.URL, c
}

// A killed child's exit word tells the parent it is dying, and the module
// restarts.
func TestExitWordReportsDeath(t *testing.T) {
	var events eventLog
	h, url, c := startExitWord(t, Options{OnEvent: events.add})
	require.NoError(t, syscall.Kill(c.proc.Pid(), syscall.SIGKILL))
	awaitReplaced(t, url, c, c.dying, "the exit word reports the death")
	<-c.exited
	assertReaped(t, c.proc.Pid())
	assert.Equal(t, 1, events.count(ChildExited, "crash"))
	assert.Equal(t, 1, h.Stats().Restarts)
}

// A child that claims in its exit word to be dying is killed, so that the
// claim the parent acted on comes true, and the module restarts.
func TestExitWordLieKills(t *testing.T) {
	var events eventLog
	_, url, c := startExitWord(t, Options{OnEvent: events.add})
	// The lie ends the child: the request may not get its answer.
	fetchErr(url+"/set?v="+strconv.Itoa(futexOwnerDied|futexWaiters|1), fetchTimeout)
	awaitReplaced(t, url, c, c.exited, "the lying child ends")
	assert.Equal(t, 1, events.count(ChildExited, "crash"))
}

// A child that keeps changing its exit word, and waking the parent, makes
// the parent stop watching the word after maxExitWordChanges, not spin;
// it serves on, and its death is still seen, from its pipe.
func TestExitWordChangesStopTheWatch(t *testing.T) {
	_, url, c := startExitWord(t, Options{})
	pid := strconv.Itoa(c.proc.Pid())
	for i := 0; ; i++ {
		select {
		case <-c.exitWatch:
		default:
			// Each value differs from the one before: the waiter
			// wakes to a change, or finds one as it goes to sleep.
			require.Less(t, i, 10*maxExitWordChanges, "the parent still watches the exit word after %d changes", i)
			code, body := fetch(t, url+"/set?v="+strconv.Itoa(futexWaiters|(2+i%2)))
			require.Equal(t, http.StatusOK, code, body)
			continue
		}
		break
	}
	select {
	case <-c.dying:
		t.Fatal("changes of the exit word were taken for a death")
	default:
	}
	_, body := fetch(t, url+"/pid")
	assert.Equal(t, pid, body, "the child that changed its word still serves")
	require.NoError(t, syscall.Kill(c.proc.Pid(), syscall.SIGKILL))
	awaitReplaced(t, url, c, c.exited, "the child ends")
}

// A child that hides the parent's waiter on its exit word, so that its
// death wakes nobody, still gets its watch ended, and is restarted from its
// pipe: its teardown waits for the watch at most exitWordPoll (the waiter
// may then find the death in the word, too late to matter).
func TestExitWordRequeueEndsTheWatch(t *testing.T) {
	h, url, c := startExitWord(t, Options{})
	// The waiter goes to sleep once the child is ready: poll until
	// /requeue finds it there.
	waitFor(t, 10*time.Second, "the waiter moved", func() bool {
		code, body := fetch(t, url+"/requeue")
		require.Equal(t, http.StatusOK, code, body)
		return body == "1"
	})
	require.NoError(t, syscall.Kill(c.proc.Pid(), syscall.SIGKILL))
	awaitReplaced(t, url, c, c.exitWatch, "the watch ends")
	assert.Equal(t, 1, h.Stats().Restarts)
}

// awaitReplaced waits for ended, which says what, and checks that another
// child than c answers at url.
func awaitReplaced(t *testing.T, url string, c *child, ended <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatalf("waited 10s for %s", what)
	}
	code, body := fetch(t, url+"/pid")
	require.Equal(t, http.StatusOK, code, body)
	assert.NotEqual(t, strconv.Itoa(c.proc.Pid()), body, "the old child answered")
}
