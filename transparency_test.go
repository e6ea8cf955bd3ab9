package subproc

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// This file checks DESIGN.md's first promise, transparency: a handler
// behaves through subproc as it behaves served in-process by net/http. Most
// tests serve the same handler twice, in-process with httptest and through a
// Handle, send both the same request with a real http.Client and compare what
// the client (or the handler) sees.

// trModules are this file's fake modules. Each function builds the handler
// that the module runs in its child; the tests also serve it in-process, as
// the reference.
var trModules = map[string]func(env *Env) http.Handler{
	"tr-mux":   trMux,
	"tr-ray-a": trRayA,
	"tr-ray-b": trRayB,
	"tr-env":   trEnv,
	"tr-noisy": trNoisy,
}

func init() {
	for name, mk := range trModules {
		Register(name, func(ctx context.Context, env *Env) (http.Handler, error) {
			return mk(env), nil
		})
	}
}

// ---- the handlers ----

// trMux is the module most tests use. env.Config, if set, is the directory
// where the cancellation handlers leave their marker files.
func trMux(env *Env) http.Handler {
	dir := string(env.Config)
	mux := http.NewServeMux()

	// The request as the handler sees it.
	mux.HandleFunc("/echo-request/", trEchoRequest)

	// Request bodies.
	mux.HandleFunc("/echo-body", func(w http.ResponseWriter, r *http.Request) {
		if err := http.NewResponseController(w).EnableFullDuplex(); err != nil {
			http.Error(w, "EnableFullDuplex: "+err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		io.Copy(w, r.Body)
	})
	mux.HandleFunc("/ignore-body", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "body ignored\n")
	})
	mux.HandleFunc("/respond-then-return", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "answered before reading the body\n")
		w.(http.Flusher).Flush()
	})
	mux.HandleFunc("/duplex", trDuplex(func(w http.ResponseWriter) error {
		w.(http.Flusher).Flush()
		return nil
	}))
	mux.HandleFunc("/duplex-rc", trDuplex(func(w http.ResponseWriter) error {
		return http.NewResponseController(w).Flush()
	}))

	// Responses.
	mux.HandleFunc("/status/{code}", func(w http.ResponseWriter, r *http.Request) {
		code, err := strconv.Atoi(r.PathValue("code"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("X-Status", r.PathValue("code"))
		w.WriteHeader(code)
		fmt.Fprintf(w, "status %d\n", code) // fails for 204 and 304, as it should
	})
	mux.HandleFunc("/error", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "something broke", http.StatusInternalServerError)
	})
	mux.HandleFunc("/forbidden", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "go away", http.StatusForbidden)
	})
	mux.HandleFunc("/not-found", http.NotFound)
	mux.HandleFunc("/multi-header", func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Add("X-Multi", "one")
		h.Add("X-Multi", "two")
		h.Add("X-Multi", "three")
		h.Set("Cache-Control", "no-store")
		http.SetCookie(w, &http.Cookie{Name: "a", Value: "1"})
		http.SetCookie(w, &http.Cookie{Name: "b", Value: "2", Path: "/", HttpOnly: true})
		io.WriteString(w, "multi")
	})
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello")
	})
	mux.HandleFunc("/empty", func(w http.ResponseWriter, r *http.Request) {})
	mux.HandleFunc("/accepted", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusAccepted)
	})
	mux.HandleFunc("/flush-empty", func(w http.ResponseWriter, r *http.Request) {
		w.(http.Flusher).Flush()
	})
	mux.HandleFunc("/small-flushed", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello")
		w.(http.Flusher).Flush()
		io.WriteString(w, " world")
	})
	mux.HandleFunc("/large", func(w http.ResponseWriter, r *http.Request) {
		p := trPattern(100 << 10)
		for len(p) > 0 {
			n := min(len(p), 1000)
			w.Write(p[:n])
			p = p[n:]
		}
	})
	mux.HandleFunc("/large-content-length", func(w http.ResponseWriter, r *http.Request) {
		p := trPattern(100 << 10)
		w.Header().Set("Content-Length", strconv.Itoa(len(p)))
		w.Write(p)
	})
	mux.HandleFunc("/html", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "<!DOCTYPE html><html><body><h1>sniff me</h1></body></html>")
	})
	mux.HandleFunc("/json", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"ok":true}`)
	})
	mux.HandleFunc("/gzip", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Content-Encoding", "gzip")
		zw := gzip.NewWriter(w)
		io.WriteString(zw, "compressed hello\n")
		zw.Close()
	})
	mux.HandleFunc("/header-after-write", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Before", "sent")
		io.WriteString(w, "body")
		w.Header().Set("X-After", "ignored")
	})
	mux.HandleFunc("/superfluous-writeheader", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
		w.WriteHeader(http.StatusInternalServerError)
		io.WriteString(w, "created")
	})
	mux.HandleFunc("/redirect/{code}", func(w http.ResponseWriter, r *http.Request) {
		code, _ := strconv.Atoi(r.PathValue("code"))
		http.Redirect(w, r, "/target?from=redirect", code)
	})
	mux.HandleFunc("/dir/sub/redirect-relative", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "../elsewhere?x=1", http.StatusFound)
	})
	mux.HandleFunc("/redirect-absolute", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "https://other.example/a%2Fb?q=1#frag", http.StatusMovedPermanently)
	})
	mux.HandleFunc("/trailers/declared", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Checksum, X-Never-Set")
		w.Header().Add("Trailer", "X-Count")
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "declared trailers follow\n")
		w.Header().Set("X-Checksum", "c0ffee")
		w.Header()["X-Count"] = []string{"1", "2"}
	})
	mux.HandleFunc("/trailers/prefix", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "prefixed trailers follow\n")
		w.(http.Flusher).Flush() // else net/http sends a Content-Length, and no trailers
		w.Header().Set(http.TrailerPrefix+"X-Late", "late value")
		w.Header().Add(http.TrailerPrefix+"X-Late-Multi", "a")
		w.Header().Add(http.TrailerPrefix+"X-Late-Multi", "b")
	})
	mux.HandleFunc("/trailers/prefix-unflushed", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "these trailers are lost\n")
		w.Header().Set(http.TrailerPrefix+"X-Late", "late value")
	})
	mux.HandleFunc("/trailers/flushed", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-A")
		io.WriteString(w, "part 1\n")
		w.(http.Flusher).Flush()
		io.WriteString(w, "part 2\n")
		w.Header().Set("X-A", "a")
		w.Header().Set(http.TrailerPrefix+"X-B", "b")
	})
	mux.HandleFunc("/early-hints", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Link", "</style.css>; rel=preload; as=style")
		w.Header().Add("Link", "</script.js>; rel=preload; as=script")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Set("X-Final", "yes")
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, "after the hints\n")
	})
	mux.HandleFunc("/stream", trStream(100, -1))
	mux.HandleFunc("/stream-slow", func(w http.ResponseWriter, r *http.Request) {
		marker := filepath.Join(dir, filepath.Base(r.URL.Query().Get("marker")))
		for i := range trSlowChunks {
			io.WriteString(w, trBigChunk(i))
			w.(http.Flusher).Flush()
			if i == trSlowMarkAt {
				trWriteFile(marker, "written")
			}
		}
	})
	mux.HandleFunc("/rc-flush", func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		io.WriteString(w, "one\n")
		err1 := rc.Flush()
		io.WriteString(w, "two\n")
		err2 := rc.Flush()
		fmt.Fprintf(w, "flush errors: %v %v\n", err1, err2)
	})

	// Panics.
	mux.HandleFunc("/panic/{how}", func(w http.ResponseWriter, r *http.Request) {
		switch r.PathValue("how") {
		case "before-write":
			panic("tr: panic before writing")
		case "after-writeheader":
			w.WriteHeader(http.StatusOK)
			panic("tr: panic after WriteHeader")
		case "after-unflushed-write":
			io.WriteString(w, "partial")
			panic("tr: panic after an unflushed write")
		case "after-flush":
			io.WriteString(w, "partial")
			w.(http.Flusher).Flush()
			panic("tr: panic after a flush")
		case "abort-after-flush":
			io.WriteString(w, "partial")
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
		http.NotFound(w, r)
	})
	mux.HandleFunc("/pid", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, os.Getpid())
	})

	// Cancellation: the handler blocks until its request is canceled, then
	// leaves a marker file in dir.
	mux.HandleFunc("/cancel/{when}", func(w http.ResponseWriter, r *http.Request) {
		marker := filepath.Join(dir, filepath.Base(r.URL.Query().Get("marker")))
		switch r.PathValue("when") {
		case "after-header":
			io.WriteString(w, "started\n")
			w.(http.Flusher).Flush()
		case "before-header":
			trWriteFile(marker+".started", "started")
		}
		<-r.Context().Done()
		trWriteFile(marker, context.Cause(r.Context()).Error())
	})
	return mux
}

// trRequestView is a request as its handler sees it.
type trRequestView struct {
	Method           string
	Proto            string
	Host             string
	RequestURI       string
	URL              string
	Path             string
	RawPath          string
	EscapedPath      string
	RawQuery         string
	Header           http.Header
	ContentLength    int64
	TransferEncoding []string
	Close            bool
	TrailerDeclared  []string    // r.Trailer's keys before the body is read
	Trailer          http.Header // r.Trailer once the body has hit EOF
	BodyLen          int64
	BodySHA256       string
	BodyErr          string
	RemoteAddr       string
}

// trEchoRequest answers with the request as the handler sees it, as JSON.
func trEchoRequest(w http.ResponseWriter, r *http.Request) {
	v := trRequestView{
		Method:           r.Method,
		Proto:            r.Proto,
		Host:             r.Host,
		RequestURI:       r.RequestURI,
		URL:              r.URL.String(),
		Path:             r.URL.Path,
		RawPath:          r.URL.RawPath,
		EscapedPath:      r.URL.EscapedPath(),
		RawQuery:         r.URL.RawQuery,
		Header:           r.Header,
		ContentLength:    r.ContentLength,
		TransferEncoding: r.TransferEncoding,
		Close:            r.Close,
		RemoteAddr:       r.RemoteAddr,
	}
	for k := range r.Trailer {
		v.TrailerDeclared = append(v.TrailerDeclared, k)
	}
	slices.Sort(v.TrailerDeclared)
	sum := sha256.New()
	n, err := io.Copy(sum, r.Body)
	v.BodyLen, v.BodySHA256 = n, hex.EncodeToString(sum.Sum(nil))
	if err != nil {
		v.BodyErr = err.Error()
	}
	v.Trailer = r.Trailer
	w.Header().Set("X-Method", r.Method)
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

// trDuplex echoes each line of the request body as it arrives, flushing
// after each: the client can only read an echo if both directions stream.
func trDuplex(flush func(http.ResponseWriter) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := http.NewResponseController(w).EnableFullDuplex(); err != nil {
			http.Error(w, "EnableFullDuplex: "+err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		if err := flush(w); err != nil {
			return
		}
		sc := bufio.NewScanner(r.Body)
		for sc.Scan() {
			fmt.Fprintf(w, "echo %s\n", sc.Text())
			if err := flush(w); err != nil {
				return
			}
		}
		fmt.Fprintf(w, "done, read error: %v\n", sc.Err())
	}
}

// trStream writes n chunks, flushing after each; it panics instead of
// writing chunk panicAt, if panicAt >= 0.
func trStream(n, panicAt int) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		for i := range n {
			if i == panicAt {
				panic("tr: the stream broke")
			}
			io.WriteString(w, trChunk(i))
			w.(http.Flusher).Flush()
		}
	}
}

func trChunk(i int) string { return fmt.Sprintf("chunk %03d\n", i) }

// The /stream-slow handler writes trSlowChunks chunks of 1000 bytes,
// flushing each, and leaves a marker once it has written chunk
// trSlowMarkAt: what fits in a stream's window, whatever the client reads.
const (
	trSlowChunks = 300
	trSlowMarkAt = 50
)

func trBigChunk(i int) string {
	s := fmt.Sprintf("big chunk %05d ", i)
	return s + strings.Repeat("-", 999-len(s)) + "\n"
}

// trChunks returns the body of chunks [0, n).
func trChunks(n int) string {
	var b strings.Builder
	for i := range n {
		b.WriteString(trChunk(i))
	}
	return b.String()
}

// trRayA and trRayB are two modules of one dashboard, after Ray's
// subprocess-module tests.
func trRayA(env *Env) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/api/a/hello", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"module": env.Name, "msg": "hello"})
	})
	mux.HandleFunc("/api/a/echo", func(w http.ResponseWriter, r *http.Request) {
		var v any
		if err := json.NewDecoder(r.Body).Decode(&v); err != nil {
			http.Error(w, "bad JSON: "+err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"echo": v})
	})
	mux.HandleFunc("/api/a/error", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "a failed", http.StatusInternalServerError)
	})
	mux.HandleFunc("/api/a/forbidden", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "not for you", http.StatusForbidden)
	})
	mux.HandleFunc("/api/a/to-b", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/api/b/landing", http.StatusFound)
	})
	mux.HandleFunc("/api/a/pid", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, os.Getpid())
	})
	return mux
}

func trRayB(env *Env) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/api/b/landing", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "landed in %s\n", env.Name)
	})
	mux.HandleFunc("/api/b/stream", trStream(100, -1))
	mux.HandleFunc("/api/b/stream-error", trStream(100, 10))
	mux.HandleFunc("/api/b/pid", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, os.Getpid())
	})
	return mux
}

// trEnvView is what the tr-env module reports of its Env.
type trEnvView struct {
	Name        string
	Incarnation int
	Config      []byte
	LogDir      string
	Pid         int
}

func trEnv(env *Env) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(trEnvView{
			Name:        env.Name,
			Incarnation: env.Incarnation,
			Config:      env.Config,
			LogDir:      env.LogDir,
			Pid:         os.Getpid(),
		})
	})
}

// trNoisy writes to its stdout and stderr in every way it can, at init and
// while serving.
func trNoisy(env *Env) http.Handler {
	trScribble("init")
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := r.URL.Query().Get("i")
		trScribble("request " + i)
		fmt.Fprintf(w, "response %s\n", i)
		w.Write(trPattern(64 << 10))
	})
}

// trGarbage looks like the start of the protocol and then is not.
var trGarbage = func() []byte {
	b := []byte("SUBPROC\x00\x00\x00\x00\x01")
	for i := range 512 {
		b = append(b, byte(i))
	}
	return append(b, '\n')
}()

func trScribble(when string) {
	fmt.Println("tr-noisy fmt.Println", when)
	fmt.Fprintf(os.Stdout, "tr-noisy os.Stdout %s\n", when)
	syscall.Write(1, []byte("tr-noisy raw fd 1 "+when+"\n"))
	os.Stdout.Write(trGarbage)
	syscall.Write(1, trGarbage)
	fmt.Fprintf(os.Stderr, "tr-noisy os.Stderr %s\n", when)
	syscall.Write(2, []byte("tr-noisy raw fd 2 "+when+"\n"))
	os.Stderr.Write(trGarbage)
}

// trPattern returns n bytes of a recognisable pattern.
func trPattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		if i%64 == 63 {
			b[i] = '\n'
		} else {
			b[i] = 'a' + byte((i/64+i)%26)
		}
	}
	return b
}

// trWriteFile writes a marker file atomically, so that a poller never sees
// it half written.
func trWriteFile(name, content string) {
	if err := os.WriteFile(name+".tmp", []byte(content), 0o644); err == nil {
		os.Rename(name+".tmp", name)
	}
}

// ---- the test harness ----

// A trTarget is one way of serving a module's handler.
type trTarget struct {
	name   string // "net/http" or "subproc"
	url    string
	client *http.Client // does not follow redirects
	h      *Handle      // nil for net/http
}

// trTargets serves the module's handler in-process by net/http and through
// a Handle, each on its own httptest server. Both are stopped when the test
// ends.
func trTargets(t *testing.T, module string, config []byte) []trTarget {
	t.Helper()
	in := httptest.NewUnstartedServer(trModules[module](&Env{Name: module, Config: config}))
	in.Config.ErrorLog = log.New(testWriter{t}, "net/http: ", 0)
	in.Start()
	t.Cleanup(in.Close)
	h := startModule(t, module, Options{Config: config})
	sp := serve(t, h)
	return []trTarget{
		{name: "net/http", url: in.URL, client: trClient(in)},
		{name: "subproc", url: sp.URL, client: trClient(sp), h: h},
	}
}

// trClient returns a client of srv that does not follow redirects. Its
// connections are closed with srv.
func trClient(srv *httptest.Server) *http.Client {
	c := *srv.Client()
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &c
}

// trContext returns a context that bounds one test's requests generously: a
// broken feature shows as a failure, not a hung test.
func trContext(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// trResponse is a response as the client sees it.
type trResponse struct {
	Status           int
	Informational    []trInformational // 1xx responses before the final one
	Header           http.Header       // without Date
	Body             string
	BodyErr          bool // reading the body failed
	Trailer          http.Header
	ContentLength    int64
	TransferEncoding []string
	Uncompressed     bool
}

type trInformational struct {
	Status int
	Header http.Header
}

// trDo sends req and reads the whole response. It also returns the local
// address of the connection the request went out on.
func trDo(client *http.Client, req *http.Request) (res *trResponse, local string, err error) {
	var mu sync.Mutex // the trace's hooks run on the transport's goroutines
	var infos []trInformational
	trace := &httptrace.ClientTrace{
		GotConn: func(ci httptrace.GotConnInfo) {
			mu.Lock()
			local = ci.Conn.LocalAddr().String()
			mu.Unlock()
		},
		Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
			mu.Lock()
			infos = append(infos, trInformational{code, trNorm(http.Header(h).Clone())})
			mu.Unlock()
			return nil
		},
	}
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
	r, err := client.Do(req)
	mu.Lock()
	defer mu.Unlock()
	if err != nil {
		return nil, local, err
	}
	defer r.Body.Close()
	body, rerr := io.ReadAll(r.Body)
	r.Header.Del("Date")
	return &trResponse{
		Status:           r.StatusCode,
		Informational:    infos,
		Header:           trNorm(r.Header),
		Body:             string(body),
		BodyErr:          rerr != nil,
		Trailer:          trNorm(r.Trailer),
		ContentLength:    r.ContentLength,
		TransferEncoding: r.TransferEncoding,
		Uncompressed:     r.Uncompressed,
	}, local, nil
}

// trNorm makes an empty header nil, so that the comparisons do not trip
// over the difference.
func trNorm(h http.Header) http.Header {
	if len(h) == 0 {
		return nil
	}
	return h
}

// trDiff lists the fields in which the structs that want and got point to
// differ; "" if none.
func trDiff(want, got any) string {
	var b strings.Builder
	wv, gv := reflect.ValueOf(want).Elem(), reflect.ValueOf(got).Elem()
	for i := range wv.NumField() {
		name := wv.Type().Field(i).Name
		w, g := wv.Field(i).Interface(), gv.Field(i).Interface()
		if reflect.DeepEqual(w, g) {
			continue
		}
		if wh, ok := w.(http.Header); ok {
			gh := g.(http.Header)
			var keys []string
			for k := range wh {
				keys = append(keys, k)
			}
			for k := range gh {
				if _, ok := wh[k]; !ok {
					keys = append(keys, k)
				}
			}
			slices.Sort(keys)
			for _, k := range keys {
				if !reflect.DeepEqual(wh[k], gh[k]) {
					fmt.Fprintf(&b, "\n\t%s[%q]: net/http %q, subproc %q", name, k, wh[k], gh[k])
				}
			}
			continue
		}
		fmt.Fprintf(&b, "\n\t%s: net/http %s, subproc %s", name, trShow(w), trShow(g))
	}
	return b.String()
}

// trShow formats v for a failure message, summarising long strings.
func trShow(v any) string {
	if s, ok := v.(string); ok && len(s) > 200 {
		sum := sha256.Sum256([]byte(s))
		return fmt.Sprintf("(%d bytes, sha256 %x…, starting %q)", len(s), sum[:6], s[:60])
	}
	return fmt.Sprintf("%#v", v)
}

// trViews sends the request that mk makes to every target and returns the
// responses, failing the test if a request fails.
func trViews(t *testing.T, targets []trTarget, mk func(base string) *http.Request) []*trResponse {
	t.Helper()
	var views []*trResponse
	for _, tg := range targets {
		res, _, err := trDo(tg.client, mk(tg.url))
		// net/http closes a connection whose large request body the
		// handler left unread; a client still writing that body may
		// then see a reset before the response, in-process as through
		// subproc. That is the client's race, not the handler's answer:
		// ask again.
		for try := 0; try < 3 && err != nil && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)); try++ {
			res, _, err = trDo(tg.client, mk(tg.url))
		}
		require.NoError(t, err, "%s", tg.name)
		views = append(views, res)
	}
	return views
}

// trCompare fails the test if the subproc view differs from net/http's.
func trCompare(t *testing.T, views []*trResponse) {
	t.Helper()
	d := trDiff(views[0], views[1])
	assert.Equal(t, "", d, "the client sees a different response through subproc:%s", d)
}

// trWaitFile waits for a file to appear, polling: it is written by another
// process, and there is no event to wait on across processes.
func trWaitFile(t *testing.T, name string, timeout time.Duration) string {
	t.Helper()
	var b []byte
	waitFor(t, timeout, filepath.Base(name)+" to appear", func() bool {
		var err error
		b, err = os.ReadFile(name)
		return err == nil
	})
	return string(b)
}

// trTrailerBody is a request body that sets the request's trailers when it
// reaches EOF, as a client that computes them from the body does.
type trTrailerBody struct {
	r   io.Reader
	req *http.Request
	set http.Header
}

func (b *trTrailerBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err == io.EOF {
		for k, v := range b.set {
			b.req.Trailer[k] = v
		}
	}
	return n, err
}

// ---- the tests ----

// TestTransparencyRequest checks that a handler sees the same request
// through subproc as in-process: method, path, raw path, query, headers,
// Host, remote address, Content-Length, transfer encoding, body and
// trailers.
func TestTransparencyRequest(t *testing.T) {
	targets := trTargets(t, "tr-mux", nil)
	ctx := trContext(t, 2*time.Minute)
	chunked := func(s string) io.Reader { return struct{ io.Reader }{strings.NewReader(s)} }
	tests := []struct {
		name    string
		method  string
		path    string // after the server's URL
		header  http.Header
		host    string
		body    func() io.Reader // nil: no body
		clen    int64            // Content-Length to send when body is set; -1 for chunked
		trailer http.Header      // trailers to send after a chunked body
		// undeclared are trailers sent too, but not declared in the
		// request's Trailer header
		undeclared http.Header
	}{
		{name: "GET", method: "GET", path: "/echo-request/plain"},
		{name: "escaped slash in path", method: "GET", path: "/echo-request/a%2Fb/c%20d"},
		{name: "unicode path", method: "GET", path: "/echo-request/caf%C3%A9"},
		{name: "raw query", method: "GET", path: "/echo-request/q?a=1&a=2&b=&c=%20%2B+d&e=%2F"},
		{name: "empty query", method: "GET", path: "/echo-request/q?"},
		{name: "multi-valued headers", method: "GET", path: "/echo-request/h", header: http.Header{
			"X-Multi":    {"one", "two", "three"},
			"Accept":     {"text/html", "application/json;q=0.9"},
			"Cookie":     {"a=1; b=2"},
			"X-Empty":    {""},
			"User-Agent": {"tr-test/1.0"},
		}},
		{name: "Host header", method: "GET", path: "/echo-request/host", host: "virtual.example:8080"},
		{name: "Te trailers", method: "GET", path: "/echo-request/te", header: http.Header{"Te": {"trailers"}}},
		{name: "HEAD", method: "HEAD", path: "/echo-request/head"},
		{name: "DELETE", method: "DELETE", path: "/echo-request/item/7"},
		{name: "OPTIONS", method: "OPTIONS", path: "/echo-request/opt"},
		{name: "custom method", method: "PROPFIND", path: "/echo-request/dav", header: http.Header{"Depth": {"1"}}},
		{name: "POST known length", method: "POST", path: "/echo-request/post",
			body: func() io.Reader { return strings.NewReader("hello, body") }, clen: 11,
			header: http.Header{"Content-Type": {"text/plain"}}},
		{name: "POST empty body", method: "POST", path: "/echo-request/post-empty",
			body: func() io.Reader { return http.NoBody }, clen: 0},
		{name: "PUT chunked", method: "PUT", path: "/echo-request/put",
			body: func() io.Reader { return chunked("streamed without a length") }, clen: -1},
		{name: "PATCH known length", method: "PATCH", path: "/echo-request/patch",
			body: func() io.Reader { return strings.NewReader(`{"op":"replace"}`) }, clen: 16},
		{name: "chunked with trailers", method: "POST", path: "/echo-request/trailers",
			body: func() io.Reader { return chunked(strings.Repeat("x", 100<<10)) }, clen: -1,
			trailer: http.Header{"X-Req-Trailer": {"after the body"}, "X-Sum": {"1", "2"}}},
		// net/http gives the handler every trailer sent, declared or not.
		{name: "chunked with undeclared trailers", method: "POST", path: "/echo-request/undeclared",
			body: func() io.Reader { return chunked("body") }, clen: -1,
			trailer: http.Header{"X-Declared": {"d"}}, undeclared: http.Header{"X-Undeclared": {"u"}}},
		{name: "chunked with only undeclared trailers", method: "POST", path: "/echo-request/undeclared-only",
			body: func() io.Reader { return chunked("body") }, clen: -1,
			trailer: http.Header{}, undeclared: http.Header{"X-Undeclared": {"u"}}},
		{name: "Expect 100-continue", method: "POST", path: "/echo-request/expect",
			header: http.Header{"Expect": {"100-continue"}},
			body:   func() io.Reader { return strings.NewReader("continue please") }, clen: 15},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var views []*trRequestView
			for _, tg := range targets {
				var body io.Reader
				if tt.body != nil {
					body = tt.body()
				}
				req, err := http.NewRequestWithContext(ctx, tt.method, tg.url+tt.path, body)
				require.NoError(t, err)
				for k, v := range tt.header {
					req.Header[k] = v
				}
				if tt.host != "" {
					req.Host = tt.host
				}
				if tt.body != nil {
					req.ContentLength = tt.clen
				}
				if tt.trailer != nil {
					req.Trailer = http.Header{}
					for k := range tt.trailer {
						req.Trailer[k] = nil
					}
					set := tt.trailer.Clone()
					maps.Copy(set, tt.undeclared)
					req.Body = io.NopCloser(&trTrailerBody{r: body, req: req, set: set})
				}
				if tt.method == "HEAD" {
					// A HEAD response has no body to carry the view;
					// the handler reports the method in a header.
					res, _, err := trDo(tg.client, req)
					require.NoError(t, err, "%s", tg.name)
					assert.Equal(t, http.StatusOK, res.Status, "%s: HEAD got %d, X-Method %q, body %q; want 200, HEAD and no body", tg.name, res.Status, res.Header.Get("X-Method"), res.Body)
					assert.Equal(t, "HEAD", res.Header.Get("X-Method"), "%s: HEAD got %d, X-Method %q, body %q; want 200, HEAD and no body", tg.name, res.Status, res.Header.Get("X-Method"), res.Body)
					assert.Equal(t, "", res.Body, "%s: HEAD got %d, X-Method %q, body %q; want 200, HEAD and no body", tg.name, res.Status, res.Header.Get("X-Method"), res.Body)
					views = append(views, nil)
					continue
				}
				res, local, err := trDo(tg.client, req)
				require.NoError(t, err, "%s", tg.name)
				require.Equal(t, http.StatusOK, res.Status, "%s: status %d, body %q", tg.name, res.Status, res.Body)
				v := new(trRequestView)
				require.NoError(t, json.Unmarshal([]byte(res.Body), v), "%s: decoding the echo", tg.name)
				assert.Equal(t, local, v.RemoteAddr, "%s: handler's RemoteAddr is %q, want the client's address %q", tg.name, v.RemoteAddr, local)
				wantHost := strings.TrimPrefix(tg.url, "http://")
				if tt.host != "" {
					wantHost = tt.host
				}
				assert.Equal(t, wantHost, v.Host, "%s: handler's Host is %q, want %q", tg.name, v.Host, wantHost)
				v.RemoteAddr, v.Host = "", "" // they differ between the two servers
				v.Header, v.Trailer = trNorm(v.Header), trNorm(v.Trailer)
				views = append(views, v)
			}
			if views[0] == nil {
				return
			}
			d := trDiff(views[0], views[1])
			assert.Equal(t, "", d, "the handler sees a different request through subproc:%s", d)
			// The reference itself must show what the case is about.
			if tt.trailer != nil {
				want := tt.trailer.Clone()
				maps.Copy(want, tt.undeclared)
				if !reflect.DeepEqual(views[0].Trailer, want) {
					t.Errorf("net/http handler saw trailers %v, want %v", views[0].Trailer, want)
				}
			}
		})
	}
}

// TestTransparencyHopByHopRequestHeaders checks that subproc removes
// hop-by-hop request headers exactly as httputil.ReverseProxy does, keeping
// "Te: trailers".
func TestTransparencyHopByHopRequestHeaders(t *testing.T) {
	// The reference: the in-process handler behind a ReverseProxy.
	backend := httptest.NewServer(trMux(&Env{Name: "tr-mux"}))
	t.Cleanup(backend.Close)
	target, err := url.Parse(backend.URL)
	require.NoError(t, err)
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host
		},
		Transport: backend.Client().Transport,
	}
	front := httptest.NewServer(rp)
	t.Cleanup(front.Close)
	sp := serve(t, startModule(t, "tr-mux", Options{}))
	ctx := trContext(t, time.Minute)

	tests := []struct {
		name   string
		header http.Header
		gone   []string // headers that must not reach the handler
		kept   []string // headers that must
	}{
		{
			name: "standard and Connection-listed",
			header: http.Header{
				"Connection":          {"X-Hop-Custom, Keep-Alive"},
				"X-Hop-Custom":        {"secret"},
				"Keep-Alive":          {"timeout=5"},
				"Proxy-Authorization": {"Basic dXNlcjpwYXNz"},
				"Proxy-Connection":    {"keep-alive"},
				"Upgrade":             {"tr-test"},
				"X-End-To-End":        {"kept"},
			},
			gone: []string{"Connection", "X-Hop-Custom", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "Upgrade"},
			kept: []string{"X-End-To-End"},
		},
		{
			name:   "several Connection values",
			header: http.Header{"Connection": {"X-A", "X-B"}, "X-A": {"a"}, "X-B": {"b"}, "X-C": {"c"}},
			gone:   []string{"Connection", "X-A", "X-B"},
			kept:   []string{"X-C"},
		},
		{name: "Te trailers kept", header: http.Header{"Te": {"trailers"}}, kept: []string{"Te"}},
		{name: "Te trailers among others", header: http.Header{"Te": {"gzip, trailers"}}, kept: []string{"Te"}},
		{name: "Te without trailers removed", header: http.Header{"Te": {"gzip"}}, gone: []string{"Te"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var views []*trRequestView
			for _, base := range []string{front.URL, sp.URL} {
				req, err := http.NewRequestWithContext(ctx, "GET", base+"/echo-request/hop", nil)
				require.NoError(t, err)
				for k, v := range tt.header {
					req.Header[k] = v
				}
				res, _, err := trDo(http.DefaultClient, req)
				require.NoError(t, err)
				v := new(trRequestView)
				require.NoError(t, json.Unmarshal([]byte(res.Body), v), "decoding the echo %q", res.Body)
				views = append(views, v)
			}
			rpv, spv := views[0], views[1]
			for _, k := range tt.gone {
				assert.NotContains(t, spv.Header, k, "hop-by-hop header %s: %q reached the module", k, spv.Header[k])
			}
			for _, k := range tt.kept {
				assert.Contains(t, spv.Header, k, "end-to-end header %s did not reach the module", k)
			}
			assert.Equal(t, rpv.Header, spv.Header, "the module sees other headers than behind httputil.ReverseProxy:\n\treverse proxy: %v\n\tsubproc:       %v", rpv.Header, spv.Header)
		})
	}
}

// TestTransparencyResponse checks that the client sees the same response
// through subproc as in-process: status, headers, body, Content-Length or
// chunking, sniffed Content-Type, HEAD, redirects, trailers, 1xx, flushes.
func TestTransparencyResponse(t *testing.T) {
	targets := trTargets(t, "tr-mux", nil)
	ctx := trContext(t, 2*time.Minute)
	type check func(*trResponse) string
	status := func(code int) check {
		return func(r *trResponse) string {
			if r.Status != code {
				return fmt.Sprintf("status %d, want %d", r.Status, code)
			}
			return ""
		}
	}
	tests := []struct {
		method, path string
		check        check // what the net/http reference must show, so the case tests what it says
	}{
		{"GET", "/status/200", status(200)},
		{"GET", "/status/201", status(201)},
		{"GET", "/status/204", status(204)},
		{"GET", "/status/304", status(304)},
		{"GET", "/status/403", status(403)},
		{"GET", "/status/404", status(404)},
		{"GET", "/status/418", status(418)},
		{"GET", "/status/599", status(599)},
		{"GET", "/error", status(500)},
		{"GET", "/forbidden", status(403)},
		{"GET", "/not-found", status(404)},
		{"GET", "/multi-header", func(r *trResponse) string {
			if len(r.Header["X-Multi"]) != 3 || len(r.Header["Set-Cookie"]) != 2 {
				return fmt.Sprintf("headers %v", r.Header)
			}
			return ""
		}},
		{"GET", "/small", func(r *trResponse) string {
			if r.ContentLength != 5 {
				return fmt.Sprintf("ContentLength %d, want 5", r.ContentLength)
			}
			return ""
		}},
		{"GET", "/empty", nil},
		{"GET", "/accepted", status(202)},
		{"GET", "/flush-empty", nil},
		{"GET", "/small-flushed", func(r *trResponse) string {
			if !slices.Equal(r.TransferEncoding, []string{"chunked"}) {
				return fmt.Sprintf("TransferEncoding %q, want chunked", r.TransferEncoding)
			}
			return ""
		}},
		{"GET", "/large", func(r *trResponse) string {
			if r.ContentLength != -1 || len(r.Body) != 100<<10 {
				return fmt.Sprintf("ContentLength %d, body %d bytes", r.ContentLength, len(r.Body))
			}
			return ""
		}},
		{"GET", "/large-content-length", nil},
		{"GET", "/html", func(r *trResponse) string {
			if ct := r.Header.Get("Content-Type"); ct != "text/html; charset=utf-8" {
				return fmt.Sprintf("Content-Type %q, want sniffed HTML", ct)
			}
			return ""
		}},
		{"GET", "/json", nil},
		{"GET", "/gzip", func(r *trResponse) string {
			if !r.Uncompressed || r.Body != "compressed hello\n" {
				return fmt.Sprintf("Uncompressed %v, body %q", r.Uncompressed, r.Body)
			}
			return ""
		}},
		{"GET", "/header-after-write", nil},
		{"GET", "/superfluous-writeheader", status(201)},
		{"GET", "/redirect/302", status(302)},
		{"GET", "/redirect/301", status(301)},
		{"GET", "/redirect/307", status(307)},
		{"GET", "/redirect/308", status(308)},
		{"POST", "/redirect/303", status(303)},
		{"GET", "/dir/sub/redirect-relative", func(r *trResponse) string {
			if loc := r.Header.Get("Location"); loc != "/dir/elsewhere?x=1" {
				return fmt.Sprintf("Location %q", loc)
			}
			return ""
		}},
		{"GET", "/redirect-absolute", status(301)},
		{"GET", "/trailers/declared", func(r *trResponse) string {
			if r.Trailer.Get("X-Checksum") != "c0ffee" {
				return fmt.Sprintf("trailers %v", r.Trailer)
			}
			return ""
		}},
		{"GET", "/trailers/prefix", func(r *trResponse) string {
			if r.Trailer.Get("X-Late") != "late value" {
				return fmt.Sprintf("trailers %v", r.Trailer)
			}
			return ""
		}},
		{"GET", "/trailers/prefix-unflushed", nil},
		{"GET", "/trailers/flushed", nil},
		{"GET", "/early-hints", func(r *trResponse) string {
			if len(r.Informational) != 1 || r.Informational[0].Status != 103 {
				return fmt.Sprintf("1xx responses %v", r.Informational)
			}
			return ""
		}},
		{"GET", "/stream", func(r *trResponse) string {
			if r.Body != trChunks(100) {
				return "the 100 chunks did not arrive in order"
			}
			return ""
		}},
		{"GET", "/rc-flush", nil},
		{"HEAD", "/small", nil},
		{"HEAD", "/empty", nil},
		{"HEAD", "/large", nil},
		{"HEAD", "/large-content-length", nil},
		{"HEAD", "/html", nil},
		{"HEAD", "/status/204", nil},
		{"HEAD", "/redirect/302", nil},
		{"HEAD", "/trailers/declared", nil},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			views := trViews(t, targets, func(base string) *http.Request {
				req, err := http.NewRequestWithContext(ctx, tt.method, base+tt.path, nil)
				require.NoError(t, err)
				return req
			})
			if tt.check != nil {
				msg := tt.check(views[0])
				require.Equal(t, "", msg, "the net/http reference does not show what the case is for: %s", msg)
			}
			trCompare(t, views)
		})
	}
}

// TestTransparencyRequestBodyStreamed checks that a 10 MiB request body
// reaches the handler intact while the handler echoes it: the body streams
// both ways at once, as net/http does for a full-duplex handler.
func TestTransparencyRequestBodyStreamed(t *testing.T) {
	targets := trTargets(t, "tr-mux", nil)
	ctx := trContext(t, 3*time.Minute)
	body := trPattern(10 << 20)
	for _, tt := range []struct {
		name string
		clen int64
	}{
		{"known length", int64(len(body))},
		{"chunked", -1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			views := trViews(t, targets, func(base string) *http.Request {
				req, err := http.NewRequestWithContext(ctx, "POST", base+"/echo-body", struct{ io.Reader }{bytes.NewReader(body)})
				require.NoError(t, err)
				req.ContentLength = tt.clen
				return req
			})
			require.Equal(t, string(body), views[0].Body, "the net/http reference did not echo the body: %s", trShow(views[0].Body))
			trCompare(t, views)
		})
	}
}

// TestTransparencyUnreadRequestBody checks handlers that answer without
// reading a large request body, or answer before they would read it: the
// client gets the answer, and the next request is served.
func TestTransparencyUnreadRequestBody(t *testing.T) {
	targets := trTargets(t, "tr-mux", nil)
	ctx := trContext(t, 3*time.Minute)
	body := trPattern(10 << 20)
	for _, path := range []string{"/ignore-body", "/respond-then-return"} {
		for _, tt := range []struct {
			name string
			clen int64
		}{
			{"known length", int64(len(body))},
			{"chunked", -1},
		} {
			t.Run(path+" "+tt.name, func(t *testing.T) {
				views := trViews(t, targets, func(base string) *http.Request {
					req, err := http.NewRequestWithContext(ctx, "POST", base+path, struct{ io.Reader }{bytes.NewReader(body)})
					require.NoError(t, err)
					req.ContentLength = tt.clen
					return req
				})
				trCompare(t, views)
				for i, tg := range targets {
					assert.Equal(t, http.StatusOK, views[i].Status, "%s: status %d, body %q, read error %v", tg.name, views[i].Status, views[i].Body, views[i].BodyErr)
					assert.False(t, views[i].BodyErr, "%s: status %d, body %q, read error %v", tg.name, views[i].Status, views[i].Body, views[i].BodyErr)
				}
				// The server is still fine.
				views = trViews(t, targets, func(base string) *http.Request {
					req, _ := http.NewRequestWithContext(ctx, "GET", base+"/small", nil)
					return req
				})
				for i, tg := range targets {
					assert.Equal(t, http.StatusOK, views[i].Status, "%s: next request: status %d, body %q", tg.name, views[i].Status, views[i].Body)
					assert.Equal(t, "hello", views[i].Body, "%s: next request: status %d, body %q", tg.name, views[i].Status, views[i].Body)
				}
			})
		}
	}
}

// TestTransparencyFullDuplex checks that a flush reaches the client at once
// and that the request body streams while the response does: the client
// writes a line, reads its echo, writes the next. Neither side buffers the
// whole body, or the exchange cannot proceed.
func TestTransparencyFullDuplex(t *testing.T) {
	targets := trTargets(t, "tr-mux", nil)
	for _, path := range []string{"/duplex", "/duplex-rc"} {
		for _, tg := range targets {
			t.Run(path+" "+tg.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
				defer cancel()
				pr, pw := io.Pipe()
				defer pw.Close()
				// The transport's Do does not return, even once ctx
				// ends, while it is blocked reading the body.
				stop := context.AfterFunc(ctx, func() { pw.CloseWithError(ctx.Err()) })
				defer stop()
				req, err := http.NewRequestWithContext(ctx, "POST", tg.url+path, pr)
				require.NoError(t, err)
				res, err := tg.client.Do(req)
				require.NoError(t, err, "the response head did not arrive before the body was sent")
				defer res.Body.Close()
				br := bufio.NewReader(res.Body)
				for i := range 3 {
					line := fmt.Sprintf("line %d", i)
					_, err := io.WriteString(pw, line+"\n")
					require.NoError(t, err, "writing %q", line)
					got, err := br.ReadString('\n')
					require.NoError(t, err, "reading the echo of %q", line)
					want := "echo " + line + "\n"
					require.Equal(t, want, got, "got %q, want %q", got, want)
				}
				pw.Close()
				rest, err := io.ReadAll(br)
				require.NoError(t, err, "reading the end")
				assert.Equal(t, "done, read error: <nil>\n", string(rest), "end of the response")
			})
		}
	}
}

// TestTransparencyStreamSlowClient checks that a streamed response reaches a
// client that reads nothing for a while, then everything: net/http would
// block the handler; subproc holds a window of it for the client, then
// delivers it all, the handler's flushes and all.
func TestTransparencyStreamSlowClient(t *testing.T) {
	dir := t.TempDir()
	h := startModule(t, "tr-mux", Options{Config: []byte(dir)})
	// Small socket buffers, so that the parent's writes to the client
	// block soon after the client stops reading.
	srv := httptest.NewUnstartedServer(h)
	srv.Listener = smallBufListener{srv.Listener, 16 << 10}
	srv.Start()
	t.Cleanup(srv.Close)
	client := srv.Client()
	tr := client.Transport.(*http.Transport)
	dial := tr.DialContext
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetReadBuffer(16 << 10)
		}
		return c, err
	}
	pid := h.Stats().Pid
	ctx := trContext(t, 2*time.Minute)
	marker := filepath.Join(dir, "slow")
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/stream-slow?marker=slow", nil)
	res, err := client.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()

	// Read nothing until the handler has written what fits in the window.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(marker); err == nil {
			break
		}
		st := h.Stats()
		require.Zero(t, st.Restarts, "the child was replaced while the client did not read: %+v", st)
		if time.Now().After(deadline) {
			t.Fatalf("the handler did not write %d chunks while the client did not read", trSlowMarkAt+1)
		}
		time.Sleep(10 * time.Millisecond)
	}
	body, err := io.ReadAll(res.Body)
	assert.NoError(t, err, "reading the body")
	var want strings.Builder
	for i := range trSlowChunks {
		want.WriteString(trBigChunk(i))
	}
	assert.Equal(t, want.String(), string(body), "body %s, want %s", trShow(string(body)), trShow(want.String()))
	if st := h.Stats(); st.Pid != pid || st.Restarts != 0 {
		t.Errorf("Stats %+v: the child was replaced (first pid %d)", st, pid)
	}
}

// TestTransparencyPanic checks handlers that panic: before writing, the
// client gets 500 (DESIGN.md's promise; net/http itself drops the
// connection); after the response started, the client's connection is
// aborted, as net/http does. Either way the child lives on.
func TestTransparencyPanic(t *testing.T) {
	targets := trTargets(t, "tr-mux", nil)
	sp := targets[1]
	ctx := trContext(t, time.Minute)
	get := func(tg trTarget, path string) (*trResponse, error) {
		req, err := http.NewRequestWithContext(ctx, "GET", tg.url+path, nil)
		require.NoError(t, err)
		res, _, err := trDo(tg.client, req)
		return res, err
	}
	pid := sp.h.Stats().Pid

	t.Run("before-write", func(t *testing.T) {
		res, err := get(sp, "/panic/before-write")
		require.NoError(t, err, "the request failed (%v), want 500", err)
		assert.Equal(t, http.StatusInternalServerError, res.Status, "got %d %q (body error %v), want 500 \"Internal Server Error\\n\"", res.Status, res.Body, res.BodyErr)
		assert.Equal(t, "Internal Server Error\n", res.Body, "got %d %q (body error %v), want 500 \"Internal Server Error\\n\"", res.Status, res.Body, res.BodyErr)
		assert.False(t, res.BodyErr, "got %d %q (body error %v), want 500 \"Internal Server Error\\n\"", res.Status, res.Body, res.BodyErr)
	})
	for _, tt := range []struct {
		how         string
		bodyAborted bool // the head arrives, then the body read fails; else the request fails
	}{
		{"after-writeheader", false},
		{"after-unflushed-write", false},
		{"after-flush", true},
		{"abort-after-flush", true},
	} {
		t.Run(tt.how, func(t *testing.T) {
			for _, tg := range targets {
				res, err := get(tg, "/panic/"+tt.how)
				switch {
				case !tt.bodyAborted && err == nil:
					t.Errorf("%s: got a response %d %q, want the request to fail", tg.name, res.Status, res.Body)
				case tt.bodyAborted && err != nil:
					t.Errorf("%s: the request failed (%v), want the head and then an aborted body", tg.name, err)
				case tt.bodyAborted && (!res.BodyErr || res.Body != "partial" || res.Status != http.StatusOK):
					t.Errorf("%s: got %d %q (body error %v), want 200 \"partial\" and an aborted body", tg.name, res.Status, res.Body, res.BodyErr)
				}
			}
		})
	}
	t.Run("child survives", func(t *testing.T) {
		res, err := get(sp, "/pid")
		require.NoError(t, err)
		st := sp.h.Stats()
		assert.Equal(t, strconv.Itoa(pid), res.Body, "after the panics: served by pid %s, Stats %+v; want pid %d and no restart", res.Body, st, pid)
		assert.Equal(t, pid, st.Pid, "after the panics: served by pid %s, Stats %+v; want pid %d and no restart", res.Body, st, pid)
		assert.Zero(t, st.Restarts, "after the panics: served by pid %s, Stats %+v; want pid %d and no restart", res.Body, st, pid)
	})
}

// TestTransparencyCancel checks that when the client goes away, the
// handler's context in the child is canceled, whether or not the handler
// had started its response.
func TestTransparencyCancel(t *testing.T) {
	dir := t.TempDir()
	targets := trTargets(t, "tr-mux", []byte(dir))
	for _, tg := range targets {
		t.Run("after-header "+tg.name, func(t *testing.T) {
			marker := filepath.Join(dir, tg.name[:3]+"-after")
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, "GET", tg.url+"/cancel/after-header?marker="+filepath.Base(marker), nil)
			res, err := tg.client.Do(req)
			require.NoError(t, err)
			defer res.Body.Close()
			line, err := bufio.NewReader(res.Body).ReadString('\n')
			require.NoError(t, err, "read %q, %v; want the handler's first line", line, err)
			require.Equal(t, "started\n", line, "read %q, %v; want the handler's first line", line, err)
			cancel()
			got := trWaitFile(t, marker, 10*time.Second)
			assert.Equal(t, context.Canceled.Error(), got, "the handler's context ended with %q, want %q", got, context.Canceled)
		})
		t.Run("before-header "+tg.name, func(t *testing.T) {
			marker := filepath.Join(dir, tg.name[:3]+"-before")
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, "GET", tg.url+"/cancel/before-header?marker="+filepath.Base(marker), nil)
			done := make(chan error, 1)
			go func() {
				res, err := tg.client.Do(req)
				if err == nil {
					res.Body.Close()
				}
				done <- err
			}()
			trWaitFile(t, marker+".started", 10*time.Second)
			cancel()
			assert.Error(t, <-done, "the canceled request succeeded")
			assert.Equal(t, context.Canceled.Error(), trWaitFile(t, marker, 10*time.Second), "the handler's context ended otherwise")
		})
	}
}

// TestTransparencyEnv checks what a module is given: its name, incarnation
// 0 for the first child, Options.Config byte for byte, and the LogDir.
func TestTransparencyEnv(t *testing.T) {
	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = byte(i*7 + i>>8)
	}
	for _, tt := range []struct {
		name   string
		config []byte
		logDir bool
	}{
		{"non-UTF-8 bytes", []byte{0x00, 0xff, 0xfe, 'a', 0x80, '\n', 0xc3, 0x28, 0x00, 0xed, 0xa0, 0x80}, false},
		{"1 MiB with LogDir", big, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			opts := Options{Config: tt.config}
			if tt.logDir {
				opts.LogDir = t.TempDir()
			}
			h := startModule(t, "tr-env", opts)
			srv := serve(t, h)
			req, _ := http.NewRequestWithContext(trContext(t, time.Minute), "GET", srv.URL+"/", nil)
			res, _, err := trDo(srv.Client(), req)
			require.NoError(t, err)
			var env trEnvView
			require.NoError(t, json.Unmarshal([]byte(res.Body), &env), "decoding %q", res.Body)
			assert.Equal(t, "tr-env", env.Name, "Env.Name = %q, want %q", env.Name, "tr-env")
			assert.Zero(t, env.Incarnation, "Env.Incarnation = %d, want 0", env.Incarnation)
			assert.Equal(t, env.Config, tt.config, "Env.Config = %s, want %s", trShow(string(env.Config)), trShow(string(tt.config)))
			assert.Equal(t, opts.LogDir, env.LogDir, "Env.LogDir = %q, want %q", env.LogDir, opts.LogDir)
			st := h.Stats()
			assert.Equal(t, st.Pid, env.Pid, "served by pid %d, Stats().Pid = %d", env.Pid, st.Pid)
		})
	}
}

// TestTransparencyNoisyModule checks that a module that writes to its
// stdout and stderr every way it can, garbage included, while serving,
// cannot corrupt the protocol: every response is right, the child is never
// restarted, and what it wrote ends up in its output.
func TestTransparencyNoisyModule(t *testing.T) {
	var out logSink
	h := startModule(t, "tr-noisy", Options{Stderr: &out})
	pid := h.Stats().Pid
	srv := serve(t, h)
	ctx := trContext(t, 2*time.Minute)
	want := string(trPattern(64 << 10))

	// One request at a time, so that this tests the output alone
	// (TestTransparencyConcurrentRequests tests concurrency).
	const requests = 20
	for i := range requests {
		req, _ := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("%s/?i=%d", srv.URL, i), nil)
		res, _, err := trDo(srv.Client(), req)
		switch {
		case err != nil:
			t.Errorf("request %d: %v", i, err)
		case res.Status != http.StatusOK || res.Body != fmt.Sprintf("response %d\n", i)+want:
			t.Errorf("request %d: status %d, body %s", i, res.Status, trShow(res.Body))
		}
	}
	st := h.Stats()
	assert.Equal(t, pid, st.Pid, "Stats %+v: the child was replaced (first pid %d)", st, pid)
	assert.Zero(t, st.Restarts, "Stats %+v: the child was replaced (first pid %d)", st, pid)
	// The output travels its own pipes; wait for the last request's.
	last := fmt.Sprintf("request %d", requests-1)
	var missing []string
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := out.String()
		missing = missing[:0]
		for _, m := range []string{"fmt.Println init", "raw fd 1 init", "os.Stderr init", "fmt.Println " + last, "os.Stdout " + last, "raw fd 1 " + last, "raw fd 2 " + last} {
			if !strings.Contains(s, "tr-noisy "+m) {
				missing = append(missing, m)
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	assert.Empty(t, missing, "the module's output lacks %q", missing)
}

// TestTransparencyConcurrentRequests checks that concurrent requests get the
// same responses through subproc as in-process, each its own, and that
// serving them never breaks the protocol.
func TestTransparencyConcurrentRequests(t *testing.T) {
	targets := trTargets(t, "tr-mux", nil)
	ctx := trContext(t, 2*time.Minute)
	paths := []string{"/large", "/small", "/stream", "/trailers/declared", "/multi-header", "/status/404", "/echo-body"}
	mk := func(base, path string, i int) *http.Request {
		var body io.Reader
		method := "GET"
		if path == "/echo-body" {
			method, body = "POST", strings.NewReader(strings.Repeat(fmt.Sprintf("request %d\n", i), 5000))
		}
		req, err := http.NewRequestWithContext(ctx, method, base+path, body)
		if err != nil {
			panic(err)
		}
		return req
	}
	const workers, perWorker = 8, 30
	for _, tg := range targets[1:] {
		pid := tg.h.Stats().Pid
		errs := make(chan string, workers*perWorker)
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				for j := range perWorker {
					i := w*perWorker + j
					path := paths[i%len(paths)]
					want, _, err := trDo(targets[0].client, mk(targets[0].url, path, i))
					if err != nil {
						errs <- fmt.Sprintf("net/http: request %d %s: %v", i, path, err)
						continue
					}
					got, _, err := trDo(tg.client, mk(tg.url, path, i))
					if err != nil {
						errs <- fmt.Sprintf("subproc: request %d %s: %v", i, path, err)
						continue
					}
					if d := trDiff(want, got); d != "" {
						errs <- fmt.Sprintf("request %d %s differs:%s", i, path, d)
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for e := range errs {
			t.Error(e)
		}
		st := tg.h.Stats()
		assert.Equal(t, pid, st.Pid, "Stats %+v: the child was replaced (first pid %d)", st, pid)
		assert.Zero(t, st.Restarts, "Stats %+v: the child was replaced (first pid %d)", st, pid)
	}
}

// TestTransparencyRayModules follows Ray's subprocess-module tests: two
// modules behind one http.ServeMux with Handle.Route, each in its own child.
func TestTransparencyRayModules(t *testing.T) {
	a := startModule(t, "tr-ray-a", Options{})
	b := startModule(t, "tr-ray-b", Options{})
	mux := http.NewServeMux()
	for _, r := range []struct {
		h            *Handle
		path, method string
	}{
		{a, "/api/a/hello", "GET"},
		{a, "/api/a/echo", "POST"},
		{a, "/api/a/error", "GET"},
		{a, "/api/a/forbidden", "GET"},
		{a, "/api/a/to-b", "GET"},
		{a, "/api/a/pid", "GET"},
		{b, "/api/b/landing", "GET"},
		{b, "/api/b/stream", "GET"},
		{b, "/api/b/stream-error", "GET"},
		{b, "/api/b/pid", "GET"},
	} {
		mux.Handle(r.path, r.h.Route(r.path, r.method))
	}
	srv := serve(t, mux)
	noFollow := trClient(srv)
	follow := srv.Client()
	ctx := trContext(t, time.Minute)

	tests := []struct {
		name        string
		method      string
		path        string
		body        string
		follow      bool
		wantStatus  int
		wantBody    string
		wantHeader  http.Header
		wantBodyErr bool
	}{
		{name: "GET", method: "GET", path: "/api/a/hello", wantStatus: 200,
			wantBody: `{"module":"tr-ray-a","msg":"hello"}` + "\n", wantHeader: http.Header{"Content-Type": {"application/json"}}},
		{name: "POST JSON echo", method: "POST", path: "/api/a/echo", body: `{"name":"ray","n":[1,2,3]}`, wantStatus: 200,
			wantBody: `{"echo":{"n":[1,2,3],"name":"ray"}}` + "\n", wantHeader: http.Header{"Content-Type": {"application/json"}}},
		{name: "error response", method: "GET", path: "/api/a/error", wantStatus: 500, wantBody: "a failed\n"},
		{name: "403", method: "GET", path: "/api/a/forbidden", wantStatus: 403, wantBody: "not for you\n"},
		{name: "wrong method on a POST route", method: "GET", path: "/api/a/echo", wantStatus: 405,
			wantHeader: http.Header{"Allow": {"POST"}}},
		{name: "wrong method on a GET route", method: "DELETE", path: "/api/a/hello", wantStatus: 405,
			wantHeader: http.Header{"Allow": {"GET, HEAD"}}},
		{name: "redirect to the other module", method: "GET", path: "/api/a/to-b", wantStatus: 302,
			wantHeader: http.Header{"Location": {"/api/b/landing"}}},
		{name: "redirect followed to the other module", method: "GET", path: "/api/a/to-b", follow: true, wantStatus: 200,
			wantBody: "landed in tr-ray-b\n"},
		{name: "streamed response", method: "GET", path: "/api/b/stream", wantStatus: 200, wantBody: trChunks(100)},
		{name: "stream error", method: "GET", path: "/api/b/stream-error", wantStatus: 200, wantBody: trChunks(10), wantBodyErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var body io.Reader
			if tt.body != "" {
				body = strings.NewReader(tt.body)
			}
			req, err := http.NewRequestWithContext(ctx, tt.method, srv.URL+tt.path, body)
			require.NoError(t, err)
			client := noFollow
			if tt.follow {
				client = follow
			}
			res, _, err := trDo(client, req)
			require.NoError(t, err)
			assert.Equal(t, tt.wantStatus, res.Status, "status %d, want %d (body %q)", res.Status, tt.wantStatus, res.Body)
			if tt.wantBody != "" {
				assert.Equal(t, tt.wantBody, res.Body, "body %s, want %s", trShow(res.Body), trShow(tt.wantBody))
			}
			assert.Equal(t, tt.wantBodyErr, res.BodyErr, "body read error: %v, want %v", res.BodyErr, tt.wantBodyErr)
			for k, v := range tt.wantHeader {
				assert.True(t, slices.Equal(res.Header[k], v), "header %s: %q, want %q", k, res.Header[k], v)
			}
		})
	}
	t.Run("separate children", func(t *testing.T) {
		pa, pb := a.Stats().Pid, b.Stats().Pid
		require.NotZero(t, pa, "pids %d and %d, want two distinct children", pa, pb)
		require.NotZero(t, pb, "pids %d and %d, want two distinct children", pa, pb)
		require.NotEqual(t, pa, pb, "pids %d and %d, want two distinct children", pa, pb)
		for _, c := range []struct {
			path string
			pid  int
		}{{"/api/a/pid", pa}, {"/api/b/pid", pb}} {
			code, body := fetch(t, srv.URL+c.path)
			assert.Equal(t, http.StatusOK, code, "GET %s: %d %q, want pid %d", c.path, code, body, c.pid)
			assert.Equal(t, strconv.Itoa(c.pid), body, "GET %s: %d %q, want pid %d", c.path, code, body, c.pid)
		}
		assert.Zero(t, a.Stats().Restarts, "restarts: a %d, b %d; want none (the stream error must not kill b)", a.Stats().Restarts, b.Stats().Restarts)
		assert.Zero(t, b.Stats().Restarts, "restarts: a %d, b %d; want none (the stream error must not kill b)", a.Stats().Restarts, b.Stats().Restarts)
	})
}
