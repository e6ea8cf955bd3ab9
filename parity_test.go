package subproc

// Side-by-side parity checks (comparing each case with in-process net/http): the same handler served in-process
// by net/http and through a Handle, over HTTP/1 and HTTP/2 (TLS).

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

func init() {
	Register("parity", func(ctx context.Context, env *Env) (http.Handler, error) {
		return parMux(), nil
	})
}

// parRec holds what handlers saw after their response could no longer
// carry it, by key, for /get to return.
var parRec sync.Map // string -> chan string (capacity 1)

func parSlot(k string) chan string {
	ch, _ := parRec.LoadOrStore(k, make(chan string, 1))
	return ch.(chan string)
}

func parPut(k, v string) {
	select {
	case parSlot(k) <- v:
	default:
	}
}

func parErrStr(err error) string {
	if err == nil {
		return "nil"
	}
	var ne net.Error
	timeout := errors.As(err, &ne) && ne.Timeout()
	return fmt.Sprintf("deadline=%v timeout=%v closed=%v eof=%v canceled=%v dlx=%v",
		errors.Is(err, os.ErrDeadlineExceeded), timeout, errors.Is(err, net.ErrClosed), errors.Is(err, io.EOF),
		errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded))
}

func parMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/info", func(w http.ResponseWriter, r *http.Request) {
		m := map[string]any{
			"Proto": r.Proto, "ProtoMajor": r.ProtoMajor, "ProtoMinor": r.ProtoMinor,
			"Host": r.Host, "RequestURI": r.RequestURI, "URL": r.URL.String(),
			"Scheme": r.URL.Scheme, "URLHost": r.URL.Host, "Close": r.Close,
			"TLS": r.TLS != nil, "ContentLength": r.ContentLength,
			"TransferEncoding": r.TransferEncoding, "RemoteAddr": r.RemoteAddr,
			"Header": r.Header, "Trailer": r.Trailer,
		}
		if r.TLS != nil {
			m["TLSVersion"] = r.TLS.Version
			m["ALPN"] = r.TLS.NegotiatedProtocol
			m["ServerName"] = r.TLS.ServerName
			m["HandshakeComplete"] = r.TLS.HandshakeComplete
		}
		b, _ := io.ReadAll(r.Body)
		m["BodyLen"] = len(b)
		m["TrailerAfter"] = r.Trailer
		json.NewEncoder(w).Encode(m)
	})
	mux.HandleFunc("/trailers", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Sum")
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "part1\n")
		http.NewResponseController(w).Flush()
		io.WriteString(w, "part2\n")
		w.Header().Set("X-Sum", "42")
		w.Header().Set(http.TrailerPrefix+"X-Late", "late")
	})
	mux.HandleFunc("/early", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload; as=style")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del("Link")
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "final")
	})
	mux.HandleFunc("/panic-after", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "start")
		http.NewResponseController(w).Flush()
		panic("parity boom")
	})
	mux.HandleFunc("/abort-after", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "start")
		http.NewResponseController(w).Flush()
		panic(http.ErrAbortHandler)
	})
	mux.HandleFunc("/abort-before", func(w http.ResponseWriter, r *http.Request) {
		panic(http.ErrAbortHandler)
	})
	mux.HandleFunc("/cl-short", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "12345")
	})
	mux.HandleFunc("/cl-long", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", "5")
		_, err := io.WriteString(w, "1234567890")
		w.Header().Set("X-Ignored", "x")
		parPut("cl-long"+r.URL.Query().Get("k"), fmt.Sprint(err))
	})
	mux.HandleFunc("/big-header", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Big", strings.Repeat("b", 200<<10))
		io.WriteString(w, "ok")
	})
	mux.HandleFunc("/duplex", func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		rc.EnableFullDuplex()
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(200)
		rc.Flush()
		sc := bufio.NewScanner(r.Body)
		for sc.Scan() {
			fmt.Fprintf(w, "echo %s\n", sc.Text())
			if err := rc.Flush(); err != nil {
				return
			}
		}
	})
	mux.HandleFunc("/ctx", func(w http.ResponseWriter, r *http.Request) {
		k := r.URL.Query().Get("k")
		if r.URL.Query().Get("flush") != "" {
			io.WriteString(w, "x")
			http.NewResponseController(w).Flush()
		}
		parPut(k+"-started", "")
		<-r.Context().Done()
		parPut(k, fmt.Sprintf("err=%v cause=%v", r.Context().Err(), context.Cause(r.Context())))
	})
	// Answers once its context ends (or after 10s): what a client that
	// half-closed its connection reads.
	mux.HandleFunc("/answer-at-end", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
		time.Sleep(50 * time.Millisecond) // the answer comes later than the cancel
		w.Header().Set("X-Answer", "late")
		_, err := fmt.Fprintf(w, "err=%v cause=%v\n", r.Context().Err(), context.Cause(r.Context()))
		fmt.Fprintf(w, "first write: %v\n", err)
	})
	mux.HandleFunc("/get", func(w http.ResponseWriter, r *http.Request) {
		select {
		case v := <-parSlot(r.URL.Query().Get("k")):
			io.WriteString(w, v)
		case <-time.After(10 * time.Second):
			http.Error(w, "nothing recorded", http.StatusNotFound)
		}
	})
	// Hijack, then the ResponseController's deadlines.
	mux.HandleFunc("/hj-rdl-after", func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		conn, _, ok := parSwitch(w, rc, "")
		if !ok {
			return
		}
		defer conn.Close()
		serr := rc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		done := make(chan error, 1)
		go func() {
			_, err := conn.Read(make([]byte, 1))
			done <- err
		}()
		var res string
		select {
		case err := <-done:
			res = parErrStr(err)
		case <-time.After(3 * time.Second):
			res = "read still blocked after 3s"
		}
		fmt.Fprintf(conn, "set=%v read=%s\n", serr, res)
	})
	mux.HandleFunc("/hj-closewrite", func(w http.ResponseWriter, r *http.Request) {
		conn, _, ok := parSwitch(w, http.NewResponseController(w), "bye")
		if !ok {
			return
		}
		defer conn.Close()
		cw, ok := conn.(interface{ CloseWrite() error })
		if !ok {
			parPut("hj-closewrite"+r.URL.Query().Get("k"), "no CloseWrite")
			return
		}
		e1 := cw.CloseWrite()
		_, ew := conn.Write([]byte("after"))
		got, er := io.ReadAll(conn)
		parPut("hj-closewrite"+r.URL.Query().Get("k"), fmt.Sprintf("closewrite=%v writeErr=%v read=%q readErr=%v", e1, ew != nil, got, er))
	})
	mux.HandleFunc("/hj-big", func(w http.ResponseWriter, r *http.Request) {
		conn, _, ok := parSwitch(w, http.NewResponseController(w), "")
		if !ok {
			return
		}
		defer conn.Close()
		buf := make([]byte, 1<<20)
		var total int
		var werr error
		for total < 256<<20 {
			n, err := conn.Write(buf)
			total += n
			if err != nil {
				werr = err
				break
			}
		}
		parPut("hj-big"+r.URL.Query().Get("k"), fmt.Sprintf("err=%v", werr != nil))
	})
	mux.HandleFunc("/hj-close-read", func(w http.ResponseWriter, r *http.Request) {
		conn, _, ok := parSwitch(w, http.NewResponseController(w), "")
		if !ok {
			return
		}
		done := make(chan error, 1)
		go func() {
			_, err := conn.Read(make([]byte, 1))
			done <- err
		}()
		time.Sleep(50 * time.Millisecond) // let the read block
		conn.Close()
		var res string
		select {
		case err := <-done:
			res = parErrStr(err)
		case <-time.After(3 * time.Second):
			res = "read still blocked"
		}
		_, werr := conn.Write([]byte("x"))
		_, rerr := conn.Read(make([]byte, 1))
		cerr := conn.Close()
		derr := conn.SetDeadline(time.Now())
		parPut("hj-close-read"+r.URL.Query().Get("k"), fmt.Sprintf("blocked read: %s | write after: %s | read after: %s | close again: %v | setdeadline: %v",
			res, parErrStr(werr), parErrStr(rerr), cerr != nil, derr != nil))
	})
	mux.HandleFunc("/hj-deadlines", func(w http.ResponseWriter, r *http.Request) {
		conn, brw, ok := parSwitch(w, http.NewResponseController(w), "")
		if !ok {
			return
		}
		defer conn.Close()
		var out []string
		conn.SetReadDeadline(time.Now().Add(-time.Second))
		_, e := brw.Read(make([]byte, 1))
		out = append(out, "past: "+parErrStr(e))
		conn.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
		_, e = conn.Read(make([]byte, 1))
		out = append(out, "short: "+parErrStr(e))
		conn.SetReadDeadline(time.Time{})
		io.WriteString(conn, "send\n") // the client sends a byte now
		b := make([]byte, 1)
		_, e = io.ReadFull(conn, b)
		out = append(out, fmt.Sprintf("cleared: %s %q", parErrStr(e), b))
		conn.SetWriteDeadline(time.Now().Add(-time.Second))
		_, e = conn.Write([]byte("nope"))
		out = append(out, "wpast: "+parErrStr(e))
		conn.SetWriteDeadline(time.Time{})
		_, e = io.WriteString(conn, strings.Join(out, " | ")+"\n")
		parPut("hj-deadlines"+r.URL.Query().Get("k"), fmt.Sprint(e))
	})
	mux.HandleFunc("/hj-rdl-queued", func(w http.ResponseWriter, r *http.Request) {
		conn, _, ok := parSwitch(w, http.NewResponseController(w), "")
		if !ok {
			return
		}
		defer conn.Close()
		b := make([]byte, 1)
		_, e1 := io.ReadFull(conn, b) // "Q"; "R" came with it
		conn.SetReadDeadline(time.Now().Add(-time.Second))
		n, e2 := conn.Read(b)
		fmt.Fprintf(conn, "first=%v second n=%d %s\n", e1, n, parErrStr(e2))
	})
	mux.HandleFunc("/hj-wdl-after", func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		conn, _, ok := parSwitch(w, rc, "")
		if !ok {
			return
		}
		defer conn.Close()
		serr := rc.SetWriteDeadline(time.Now().Add(-time.Second))
		_, werr := conn.Write([]byte("x"))
		conn.SetWriteDeadline(time.Time{})
		fmt.Fprintf(conn, "set=%v write=%s\n", serr, parErrStr(werr))
	})
	// An SSE-style loop that ends on a failed Flush alone.
	mux.HandleFunc("/flush-only", func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		k := r.URL.Query().Get("k")
		io.WriteString(w, "x")
		rc.Flush()
		parPut(k+"-started", "")
		<-r.Context().Done()
		for i := 0; i < 3000; i++ {
			fmt.Fprintf(w, "data: %d\n\n", i)
			if err := rc.Flush(); err != nil {
				parPut(k, "flush failed")
				return
			}
			time.Sleep(time.Millisecond)
		}
		parPut(k, "flush never failed")
	})
	mux.HandleFunc("/hj-buffered", func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		defer conn.Close()
		b := make([]byte, 5)
		_, err = io.ReadFull(brw, b)
		io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: parity\r\n\r\n")
		fmt.Fprintf(conn, "%q %v\n", b, err)
	})
	mux.HandleFunc("/hj-race", func(w http.ResponseWriter, r *http.Request) {
		conn, _, ok := parSwitch(w, http.NewResponseController(w), "")
		if !ok {
			return
		}
		var wg sync.WaitGroup
		var rerr, werr error
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, rerr = io.Copy(io.Discard, conn)
		}()
		go func() {
			defer wg.Done()
			buf := make([]byte, 100<<10)
			for werr == nil {
				_, werr = conn.Write(buf)
			}
		}()
		time.Sleep(100 * time.Millisecond)
		conn.SetWriteDeadline(time.Now())
		cerr := conn.Close()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
			parPut("hj-race"+r.URL.Query().Get("k"), fmt.Sprintf("close=%v read: %s | write: %s", cerr, parErrStr(rerr), parErrStr(werr)))
		case <-time.After(5 * time.Second):
			parPut("hj-race"+r.URL.Query().Get("k"), "stuck")
		}
	})
	mux.HandleFunc("/1xx-after-body", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "a")
		http.NewResponseController(w).Flush()
		w.WriteHeader(http.StatusEarlyHints)
		io.WriteString(w, "b")
	})
	return mux
}

// parSwitch hijacks w's connection and answers 101, followed by after:
// the start of every upgrade handler here. It reports false, having
// answered 500, if the hijack failed.
func parSwitch(w http.ResponseWriter, rc *http.ResponseController, after string) (net.Conn, *bufio.ReadWriter, bool) {
	conn, brw, err := rc.Hijack()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return nil, nil, false
	}
	io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: parity\r\n\r\n"+after)
	return conn, brw, true
}

// parTarget is one server of the handler.
type parTarget struct {
	name   string
	url    string
	client *http.Client
	srv    *httptest.Server
	h      *Handle
}

// parTargets serves parMux in-process and through a Handle, over HTTP/1
// (plain) and, with h2, HTTP/2 over TLS.
func parTargets(t *testing.T, h2 bool) []parTarget {
	t.Helper()
	h := startModule(t, "parity", Options{HealthInterval: time.Hour})
	mk := func(name string, hd http.Handler) parTarget {
		srv := httptest.NewUnstartedServer(hd)
		srv.Config.ErrorLog = log.New(testWriter{t}, name+": ", 0)
		if h2 {
			srv.EnableHTTP2 = true
			srv.StartTLS()
		} else {
			srv.Start()
		}
		t.Cleanup(srv.Close)
		c := *srv.Client()
		c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
		return parTarget{name: name, url: srv.URL, client: &c, srv: srv}
	}
	in := mk("net/http", parMux())
	sp := mk("subproc", h)
	sp.h = h
	return []parTarget{in, sp}
}

func parGet(t *testing.T, tg parTarget, path string) (int, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", tg.url+path, nil)
	res, err := tg.client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return res.StatusCode, string(b), err
}
