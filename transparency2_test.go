package subproc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// This file checks what a handler shares with the parent's middleware in
// front of a Handle, and what net/http does around a handler: the header
// map the middleware has filled when it calls the Handle, the error kinds
// of a request body the middleware wraps (http.MaxBytesReader), and the
// removal of a parsed multipart form's temporary files when the request
// ends. As in transparency_test.go, the same handler is served in-process
// and through a Handle, behind the same middleware, and the client's views
// are compared.

func init() {
	Register("tp2-mux", func(ctx context.Context, env *Env) (http.Handler, error) {
		return tp2Mux(), nil
	})
}

// tp2Mux is the module of this file's tests.
func tp2Mux() http.Handler {
	mux := http.NewServeMux()

	// A handler that finds the middleware's header fields in its map,
	// replaces one, deletes another, sends early hints, and changes its
	// map again before the final head. Its body lists the map as the
	// handler found it.
	mux.HandleFunc("/headers", func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		var saw []string
		for k, v := range h {
			saw = append(saw, fmt.Sprintf("%s=%q", k, v))
		}
		slices.Sort(saw)
		h.Set("Content-Type", "text/x-module")
		h.Del("X-Mw-Del")
		h.Add("Link", "</style.css>; rel=preload; as=style")
		w.WriteHeader(http.StatusEarlyHints)
		h.Set("X-Mw", "module")
		h.Del("Link")
		h.Del("X-Mw-Only-Before-Hints")
		h.Add("X-Mw-Multi", "module")
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, strings.Join(saw, "\n")+"\n")
	})

	// A handler that reads its whole body and answers by how the read
	// ended: 413 for a body over a MaxBytesReader's limit, as a handler
	// that enforces one does.
	mux.HandleFunc("/read-body", func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		var mbe *http.MaxBytesError
		switch {
		case errors.As(err, &mbe):
			http.Error(w, fmt.Sprintf("body over the limit of %d bytes", mbe.Limit), http.StatusRequestEntityTooLarge)
		case err != nil:
			http.Error(w, fmt.Sprintf("read %d bytes, then: %v (unexpected EOF: %t)", len(b), err, errors.Is(err, io.ErrUnexpectedEOF)), http.StatusBadRequest)
		default:
			fmt.Fprintf(w, "read %d bytes\n", len(b))
		}
	})

	// A handler that parses a multipart upload to temporary files and
	// reports how many there are in os.TempDir, or panics.
	mux.HandleFunc("/multipart", func(w http.ResponseWriter, r *http.Request) {
		if err := r.ParseMultipartForm(1 << 10); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		files, _ := filepath.Glob(filepath.Join(os.TempDir(), "multipart-*"))
		if r.URL.Query().Get("panic") != "" {
			panic("tp2: panic after parsing a multipart form")
		}
		fmt.Fprintf(w, "%d temporary files\n", len(files))
	})
	return mux
}

// tp2Targets serves handler behind mw in-process by net/http, and module
// behind mw through a Handle. Both are stopped when the test ends.
func tp2Targets(t *testing.T, mw func(http.Handler) http.Handler, opts Options) []trTarget {
	t.Helper()
	in := httptest.NewUnstartedServer(mw(tp2Mux()))
	in.Config.ErrorLog = log.New(testWriter{t}, "net/http: ", 0)
	in.Start()
	t.Cleanup(in.Close)
	h := startModule(t, "tp2-mux", opts)
	sp := serve(t, mw(h))
	return []trTarget{
		{name: "net/http", url: in.URL, client: trClient(in)},
		{name: "subproc", url: sp.URL, client: trClient(sp), h: h},
	}
}

// TestTransparencyMiddlewareHeaders checks that a handler starts with the
// header map a middleware in front of it filled, and that what the client
// sees is the handler's map at each WriteHeader, 1xx and final: the fields
// it replaced or deleted are not duplicated, nor dropped after early
// hints. Through subproc, the middleware's hop-by-hop fields stay.
func TestTransparencyMiddlewareHeaders(t *testing.T) {
	mw := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			h := w.Header()
			h.Set("Content-Type", "text/x-middleware")
			h.Set("X-Mw", "middleware")
			h.Set("X-Mw-Del", "deleted by the module")
			h.Set("X-Mw-Only-Before-Hints", "deleted after the hints")
			h.Add("X-Mw-Multi", "one")
			h.Add("X-Mw-Multi", "two")
			h.Set("Cache-Control", "no-store")
			next.ServeHTTP(w, r)
		})
	}
	targets := tp2Targets(t, mw, Options{})
	ctx := trContext(t, time.Minute)
	views := trViews(t, targets, func(base string) *http.Request {
		req, err := http.NewRequestWithContext(ctx, "GET", base+"/headers", nil)
		require.NoError(t, err)
		return req
	})
	ref := views[0]
	require.Len(t, ref.Informational, 1, "the net/http reference does not show what the test is for: %+v", ref)
	require.Equal(t, "middleware", ref.Informational[0].Header.Get("X-Mw"), "the net/http reference does not show what the test is for: %+v", ref)
	require.Equal(t, "text/x-module", ref.Header.Get("Content-Type"), "the net/http reference does not show what the test is for: %+v", ref)
	require.Contains(t, ref.Body, "X-Mw-Del=", "the net/http reference does not show what the test is for: %+v", ref)
	trCompare(t, views)
}

// A middleware's "Connection: close" stays with the parent's response
// whatever the module does with its header map: it is about the parent's
// connection to the client.
func TestTransparencyMiddlewareConnectionClose(t *testing.T) {
	mw := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Connection", "close")
			next.ServeHTTP(w, r)
		})
	}
	ctx := trContext(t, time.Minute)
	for _, tg := range tp2Targets(t, mw, Options{}) {
		req, err := http.NewRequestWithContext(ctx, "GET", tg.url+"/headers", nil)
		require.NoError(t, err)
		res, err := tg.client.Do(req)
		require.NoError(t, err, "%s", tg.name)
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		// The client takes "Connection: close" out of the header.
		assert.True(t, res.Close, "%s: the response does not close the connection", tg.name)
	}
}

// TestTransparencyMaxBytesReader checks that a handler behind a parent's
// http.MaxBytesReader gets a *http.MaxBytesError with the reader's limit,
// as in-process, so that it answers 413 Request Entity Too Large (and the
// client sees the "Connection: close" that MaxBytesReader asks for).
func TestTransparencyMaxBytesReader(t *testing.T) {
	const limit = 1000
	mw := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			r.Body = http.MaxBytesReader(w, r.Body, limit)
			next.ServeHTTP(w, r)
		})
	}
	targets := tp2Targets(t, mw, Options{})
	ctx := trContext(t, time.Minute)
	for _, size := range []int{limit, 5 * limit, 200 << 10} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			views := trViews(t, targets, func(base string) *http.Request {
				req, err := http.NewRequestWithContext(ctx, "POST", base+"/read-body", bytes.NewReader(make([]byte, size)))
				require.NoError(t, err)
				return req
			})
			want := http.StatusOK
			if size > limit {
				want = http.StatusRequestEntityTooLarge
			}
			require.Equal(t, want, views[0].Status, "the net/http reference answered %d %q, want %d", views[0].Status, views[0].Body, want)
			trCompare(t, views)
		})
	}
}

// tp2ResetBody is a request body whose client resets the connection after
// n bytes, as net/http's body then reports it.
type tp2ResetBody struct {
	r io.ReadCloser
	n int
}

func (b *tp2ResetBody) Read(p []byte) (int, error) {
	if b.n == 0 {
		return 0, &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}
	}
	n, err := b.r.Read(p[:min(len(p), b.n)])
	b.n -= n
	return n, err
}

func (b *tp2ResetBody) Close() error { return b.r.Close() }

// A handler whose client went away while sending the body learns so from
// its read's error, which also matches io.ErrUnexpectedEOF.
func TestTransparencyBodyClientGone(t *testing.T) {
	mw := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			r.Body = &tp2ResetBody{r: r.Body, n: 1000}
			next.ServeHTTP(w, r)
		})
	}
	h := startModule(t, "tp2-mux", Options{})
	srv := serve(t, mw(h))
	ctx := trContext(t, time.Minute)
	req, err := http.NewRequestWithContext(ctx, "POST", srv.URL+"/read-body", bytes.NewReader(make([]byte, 5000)))
	require.NoError(t, err)
	res, _, err := trDo(srv.Client(), req)
	require.NoError(t, err)
	want := fmt.Sprintf("read 1000 bytes, then: %v (unexpected EOF: true)\n", errClientGone)
	assert.Equal(t, http.StatusBadRequest, res.Status, "got %d %q, want 400 %q", res.Status, res.Body, want)
	assert.Equal(t, want, res.Body, "got %d %q, want 400 %q", res.Status, res.Body, want)
}

// The payload of a body error round-trips its kind, and a malformed one is
// rejected, never a panic.
func TestBodyErrorPayload(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	reset := &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}
	for _, tt := range []struct {
		name   string
		err    error
		ctxErr error
		check  func(error) bool
	}{
		{"max bytes", &http.MaxBytesError{Limit: 1000}, nil, func(err error) bool {
			var mbe *http.MaxBytesError
			return errors.As(err, &mbe) && mbe.Limit == 1000
		}},
		{"max bytes wrapped", fmt.Errorf("wrapped: %w", &http.MaxBytesError{Limit: math.MaxInt64}), nil, func(err error) bool {
			var mbe *http.MaxBytesError
			return errors.As(err, &mbe) && mbe.Limit == math.MaxInt64
		}},
		{"max bytes zero", &http.MaxBytesError{}, nil, func(err error) bool {
			var mbe *http.MaxBytesError
			return errors.As(err, &mbe) && mbe.Limit == 0
		}},
		{"reset", reset, nil, func(err error) bool { return err == errClientGone }},
		{"canceled", errors.New("some read error"), canceled.Err(), func(err error) bool { return err == errClientGone }},
		{"other", errors.New("some read error"), nil, func(err error) bool { return err == io.ErrUnexpectedEOF }},
		{"deadline", os.ErrDeadlineExceeded, context.DeadlineExceeded, func(err error) bool { return err == io.ErrUnexpectedEOF }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := appendBodyError(nil, tt.err, tt.ctxErr)
			require.LessOrEqual(t, len(p), maxBodyErrorLen, "payload of %d bytes, more than %d", len(p), maxBodyErrorLen)
			err, ok := parseBodyError(p)
			if !ok || !tt.check(err) {
				t.Errorf("payload %x decodes to %v, %t", p, err, ok)
			}
		})
	}
	for _, p := range [][]byte{
		nil,
		{bodyErrOther, 0},
		{bodyErrGone, 0},
		{bodyErrClosed, 0},
		{bodyErrTooLarge},
		{bodyErrTooLarge, 0x80},
		{bodyErrTooLarge, 1, 0},
		{bodyErrTooLarge, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, // 1<<64-1
		{bodyErrTooLarge, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01},
		{4},
		{0xff},
	} {
		if err, ok := parseBodyError(p); ok {
			t.Errorf("malformed payload %x accepted as %v", p, err)
		}
	}
}

// dispatchToBody gives a server that has request 1 open, with a body of
// unknown length, the frame f, and returns the request and dispatch's
// error. recv, if not nil, is the server's down ring.
func dispatchToBody(t *testing.T, f outFrame, recv *bodyRing) (startingRequest, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	srv := newServer(ctx, nil, newConn(bytes.NewReader(frames(f)), nopWriteCloser{io.Discard}), newLocalWord(), http.NotFoundHandler())
	srv.recvRing = recv
	r, err := srv.open(1, 0, &requestHead{Method: "POST", Path: "/", ContentLength: -1})
	require.NoError(t, err)
	t.Cleanup(func() { r.st.cancel(nil) })
	hdr, err := srv.fr.ReadHeader()
	require.NoError(t, err)
	return r, srv.dispatch(hdr, &srv.scratch)
}

// The child ends a request body with the error a body-error frame
// describes, and takes a malformed one for a protocol error.
func TestServerBodyError(t *testing.T) {
	tests := []struct {
		name    string
		payload []byte
		want    func(error) bool // nil: a protocol error
	}{
		{"max bytes", appendBodyError(nil, &http.MaxBytesError{Limit: 7}, nil), func(err error) bool {
			var mbe *http.MaxBytesError
			return errors.As(err, &mbe) && mbe.Limit == 7
		}},
		{"gone", []byte{bodyErrGone}, func(err error) bool { return err == errClientGone }},
		{"other", []byte{bodyErrOther}, func(err error) bool { return err == io.ErrUnexpectedEOF }},
		{"closed", []byte{bodyErrClosed}, func(err error) bool { return err == http.ErrBodyReadAfterClose }},
		{"empty", nil, nil},
		{"unknown kind", []byte{42}, nil},
		{"too long", make([]byte, maxBodyErrorLen+1), nil},
		{"huge", make([]byte, 1<<20), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := dispatchToBody(t, outFrame{kind: kindEnd, flags: flagBodyError, id: 1, data: tt.payload}, nil)
			var pe *protocolError
			if tt.want == nil {
				require.True(t, errors.As(err, &pe), "dispatch: %v, want a protocol error", err)
				return
			}
			require.NoError(t, err, "dispatch")
			n, err := r.req.Body.Read(make([]byte, 10))
			if n != 0 || !tt.want(err) {
				t.Errorf("the handler's read returned %d, %v", n, err)
			}
		})
	}
}

// TestMultipartTempFilesRemoved checks that the temporary files of a
// multipart form that a handler parsed are removed once its request has
// ended, as net/http removes them, and also after the handler panicked.
func TestMultipartTempFilesRemoved(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("TMPDIR", dir) // the child inherits the environment
	h := startModule(t, "tp2-mux", Options{})
	srv := serve(t, h)
	ctx := trContext(t, time.Minute)

	var body bytes.Buffer
	mp := multipart.NewWriter(&body)
	fw, err := mp.CreateFormFile("upload", "upload.bin")
	require.NoError(t, err)
	fw.Write(bytes.Repeat([]byte("0123456789abcdef"), 3<<20/16))
	mp.Close()

	temporary := func() []string {
		files, err := filepath.Glob(filepath.Join(dir, "multipart-*"))
		require.NoError(t, err)
		return files
	}
	for _, tt := range []struct {
		name, query string
		status      int
		body        string
	}{
		{"returns", "", http.StatusOK, "1 temporary files\n"},
		{"panics", "?panic=1", http.StatusInternalServerError, "Internal Server Error\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequestWithContext(ctx, "POST", srv.URL+"/multipart"+tt.query, bytes.NewReader(body.Bytes()))
			require.NoError(t, err)
			req.Header.Set("Content-Type", mp.FormDataContentType())
			res, _, err := trDo(srv.Client(), req)
			require.NoError(t, err)
			require.Equal(t, tt.status, res.Status, "got %d %q, want %d %q", res.Status, res.Body, tt.status, tt.body)
			require.Equal(t, tt.body, res.Body, "got %d %q, want %d %q", res.Status, res.Body, tt.status, tt.body)
			// The child removes the files after it has sent the end of
			// the response, as net/http does; it says nothing when done.
			deadline := time.Now().Add(10 * time.Second)
			for files := temporary(); len(files) > 0; files = temporary() {
				if time.Now().After(deadline) {
					t.Fatalf("temporary files left after the response: %v", files)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}
