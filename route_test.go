package subproc_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/fbbf71ac/subproc"
	"github.com/fbbf71ac/subproc/subproctest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// routeNames are the wildcard names routeHandler reports.
var routeNames = []string{"id", "rest", "name"}

// routeHandler writes what a handler sees of the pattern its request
// matched: r.Pattern and the path values of routeNames.
func routeHandler(w http.ResponseWriter, r *http.Request) {
	fmt.Fprintf(w, "%s pattern=%q", r.Method, r.Pattern)
	for _, n := range routeNames {
		fmt.Fprintf(w, " %s=%q", n, r.PathValue(n))
	}
}

// routeModuleMux is the module's own mux in "route-mux".
const routeModuleMux = "GET /pv/{name}/{rest...}"

func init() {
	subproc.Register("route-pv", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		return http.HandlerFunc(routeHandler), nil
	})
	subproc.Register("route-mux", func(ctx context.Context, env *subproc.Env) (http.Handler, error) {
		mux := http.NewServeMux()
		mux.HandleFunc(routeModuleMux, routeHandler)
		return mux, nil
	})
}

// routeAnswer is what a request got, to compare through a module and
// in-process.
type routeAnswer struct {
	status int
	allow  string
	body   string
}

func routeDo(t *testing.T, srv *httptest.Server, method, path string) routeAnswer {
	t.Helper()
	req, err := http.NewRequest(method, srv.URL+path, nil)
	require.NoError(t, err)
	res, err := srv.Client().Do(req)
	require.NoError(t, err, "%s %s", method, path)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err, "%s %s", method, path)
	return routeAnswer{res.StatusCode, res.Header.Get("Allow"), string(b)}
}

// newRouteServer serves h, without following redirects.
func newRouteServer(t *testing.T, h http.Handler) *httptest.Server {
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	srv.Client().CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return srv
}

// Route matches as a ServeMux with its one pattern does: wildcards,
// "{name...}", "{$}", a trailing slash, HEAD for GET, 404 and 405 with
// Allow; and the handler in the child reads the pattern and path values
// that the match set, as in-process.
func TestRouteMatchesAsServeMux(t *testing.T) {
	h := subproctest.Start(t, "route-pv", subproc.Options{})
	type request struct {
		method, path string
		want         routeAnswer // checked if status is set; always against in-process
	}
	for _, tt := range []struct {
		path, method string
		requests     []request
	}{
		{"/v2/x/{id}", "GET", []request{
			{"GET", "/v2/x/42", routeAnswer{200, "", `GET pattern="GET /v2/x/{id}" id="42" rest="" name=""`}},
			{"HEAD", "/v2/x/42", routeAnswer{200, "", ""}},
			{"POST", "/v2/x/42", routeAnswer{status: 405, allow: "GET, HEAD"}},
			{"GET", "/v2/x/a%2Fb", routeAnswer{200, "", `GET pattern="GET /v2/x/{id}" id="a/b" rest="" name=""`}},
			{"GET", "/v2/x/42/more", routeAnswer{status: 404}},
			{"GET", "/v2/x/", routeAnswer{status: 404}},
			{"GET", "/v2/x/{id}", routeAnswer{200, "", `GET pattern="GET /v2/x/{id}" id="{id}" rest="" name=""`}},
		}},
		{"/files/{id}/{rest...}", "GET", []request{
			{"GET", "/files/7/a/b/c", routeAnswer{200, "", `GET pattern="GET /files/{id}/{rest...}" id="7" rest="a/b/c" name=""`}},
			{"GET", "/files/7/", routeAnswer{200, "", `GET pattern="GET /files/{id}/{rest...}" id="7" rest="" name=""`}},
			{"GET", "/files/7", routeAnswer{status: 307}}, // to /files/7/, as ServeMux does
		}},
		{"/exact/{$}", "PUT", []request{
			{"PUT", "/exact/", routeAnswer{200, "", `PUT pattern="PUT /exact/{$}" id="" rest="" name=""`}},
			{"PUT", "/exact/a", routeAnswer{status: 404}},
			{"GET", "/exact/", routeAnswer{status: 405, allow: "PUT"}},
		}},
		{"/tree/", "POST", []request{
			{"POST", "/tree/a/b", routeAnswer{200, "", `POST pattern="POST /tree/" id="" rest="" name=""`}},
			{"POST", "/tree/", routeAnswer{status: 200}},
			{"GET", "/tree/a", routeAnswer{status: 405, allow: "POST"}},
			{"POST", "/treeish", routeAnswer{status: 404}},
			{"GET", "/tree", routeAnswer{status: 405, allow: "POST"}},
			{"POST", "/tree", routeAnswer{status: 307}}, // to /tree/
		}},
		{"/any/{id}", "", []request{
			{"DELETE", "/any/1", routeAnswer{200, "", `DELETE pattern="/any/{id}" id="1" rest="" name=""`}},
			{"PROPFIND", "/any/2", routeAnswer{status: 200}},
			{"GET", "/any/1/2", routeAnswer{status: 404}},
		}},
		{"/dav/{id}", "PROPFIND", []request{
			{"PROPFIND", "/dav/1", routeAnswer{status: 200}},
			{"GET", "/dav/1", routeAnswer{status: 405, allow: "PROPFIND"}},
		}},
		{"/", "GET", []request{
			{"GET", "/anything/at/all", routeAnswer{200, "", `GET pattern="GET /" id="" rest="" name=""`}},
			{"GET", "/a/../b", routeAnswer{}},
		}},
	} {
		pattern := tt.path
		if tt.method != "" {
			pattern = tt.method + " " + tt.path
		}
		in := http.NewServeMux()
		in.HandleFunc(pattern, routeHandler)
		inProcess := newRouteServer(t, in)
		module := newRouteServer(t, h.Route(tt.path, tt.method))
		for _, req := range tt.requests {
			got := routeDo(t, module, req.method, req.path)
			assert.Equal(t, routeDo(t, inProcess, req.method, req.path), got, "Route(%q, %q): %s %s through the module, want as in-process", tt.path, tt.method, req.method, req.path)
			w := req.want
			if w.status != 0 && (got.status != w.status || got.allow != w.allow || (w.body != "" && got.body != w.body)) {
				t.Errorf("Route(%q, %q): %s %s got %+v, want %+v", tt.path, tt.method, req.method, req.path, got, w)
			}
		}
	}
}

// The pattern and path values the parent's ServeMux matched reach the
// child's request; the module's own mux, if it matches, sets its own.
func TestRoutePathValuesCross(t *testing.T) {
	pv := subproctest.Start(t, "route-pv", subproc.Options{})
	own := subproctest.Start(t, "route-mux", subproc.Options{})
	for _, tt := range []struct {
		name      string
		pattern   string
		h         http.Handler // through the module
		inProcess http.Handler // the same, in-process
		paths     []string
		want      string // for the first path
	}{
		{"ServeMux", "GET /pv/{id}/{rest...}", pv, http.HandlerFunc(routeHandler),
			[]string{"/pv/1/a/b", "/pv/%2F/x%20y", "/pv/1/"},
			`GET pattern="GET /pv/{id}/{rest...}" id="1" rest="a/b" name=""`},
		{"no wildcards", "/", pv, http.HandlerFunc(routeHandler),
			[]string{"/x/y"},
			`GET pattern="/" id="" rest="" name=""`},
		{"Route behind ServeMux", "GET /v2/x/{id}", pv.Route("/v2/x/{id}", "GET"), routeServeMux("GET /v2/x/{id}"),
			[]string{"/v2/x/42"},
			`GET pattern="GET /v2/x/{id}" id="42" rest="" name=""`},
		{"Route below a prefix", "/v3/", pv.Route("/v3/{name}/{id}", "GET"), routeServeMux("GET /v3/{name}/{id}"),
			[]string{"/v3/a/b"},
			`GET pattern="GET /v3/{name}/{id}" id="b" rest="" name="a"`},
		// id is not a wildcard of the module's pattern: in-process it
		// reads "" after the module's mux, in the child the parent's
		// value (see serve.go), so this one is not compared.
		{"the module's own mux", "GET /pv/{id}/{rest...}", own, nil,
			[]string{"/pv/1/a/b"},
			`GET pattern="GET /pv/{name}/{rest...}" id="1" rest="a/b" name="1"`},
	} {
		mux := http.NewServeMux()
		mux.Handle(tt.pattern, tt.h)
		module := newRouteServer(t, mux)
		var inProcess *httptest.Server
		if tt.inProcess != nil {
			in := http.NewServeMux()
			in.Handle(tt.pattern, tt.inProcess)
			inProcess = newRouteServer(t, in)
		}
		for i, p := range tt.paths {
			got := routeDo(t, module, "GET", p)
			if i == 0 && got.body != tt.want {
				t.Errorf("%s: GET %s through the module: %s, want %s", tt.name, p, got.body, tt.want)
			}
			if tt.inProcess == nil {
				continue
			}
			want := routeDo(t, inProcess, "GET", p)
			assert.Equal(t, want, got, "%s: GET %s: through the module %+v, in-process %+v", tt.name, p, got, want)
		}
	}
}

// routeServeMux is what Route does in-process: a ServeMux with one
// pattern, for routeHandler.
func routeServeMux(pattern string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(pattern, routeHandler)
	return mux
}

// Route panics on a path or method that ServeMux would reject, or that
// would match nothing, naming the module; it accepts what ServeMux does.
func TestRouteRejectsBadPatterns(t *testing.T) {
	h := subproctest.Start(t, "route-pv", subproc.Options{})
	for _, tt := range []struct{ path, method, want string }{
		{"", "GET", "the path must begin with a slash"},
		{"api/x/", "GET", `the path must begin with a slash, as in "/api/x/"`},
		{"example.com/x", "GET", "the path must begin with a slash"},
		{"/x", "get", `invalid method "get": methods are case-sensitive; use "GET"`},
		{"/x", "Post", `use "POST"`},
		{"/x", "GET POST", `invalid method "GET POST"`},
		{"/x", "GET\t", "invalid method"},
		{"/a b", "", "a path with a space or tab needs a method"},
		{"/x/{", "GET", `parsing "GET /x/{": at offset 7: bad wildcard segment (must end with '}')`},
		{"/x/{a}/{a}", "GET", `duplicate wildcard name "a"`},
		{"/x/{rest...}/y", "GET", "{...} wildcard not at end"},
		{"/x/{$}/y", "GET", "{$} not at end"},
		{"/x/{1a}", "GET", `bad wildcard name "1a"`},
		{"/x/a{b}", "GET", "bad wildcard segment (must start with '{')"},
		{"/a/../b", "GET", "unclean path can never match"},
	} {
		func() {
			defer func() {
				v := recover()
				prefix := fmt.Sprintf(`subproc: Route(%q, %q) for module "route-pv": `, tt.path, tt.method)
				s := fmt.Sprint(v)
				assert.NotNil(t, v, "Route(%q, %q) panicked with %v; want %s…%s", tt.path, tt.method, v, prefix, tt.want)
				assert.True(t, strings.HasPrefix(s, prefix), "Route(%q, %q) panicked with %v; want %s…%s", tt.path, tt.method, v, prefix, tt.want)
				assert.Contains(t, s, tt.want, "Route(%q, %q) panicked with %v; want %s…%s", tt.path, tt.method, v, prefix, tt.want)
			}()
			h.Route(tt.path, tt.method)
		}()
	}
	for _, tt := range []struct{ path, method string }{
		{"/x", ""}, {"/x", "PROPFIND"}, {"/x", "M-SEARCH"}, {"/a b", "GET"}, {"/a/../b", ""}, {"/{$}", "GET"},
		{"/x/{id}/{rest...}", "DELETE"}, {"/x/", "CONNECT"},
	} {
		func() {
			defer func() {
				if v := recover(); v != nil {
					t.Errorf("Route(%q, %q) panicked: %v", tt.path, tt.method, v)
				}
			}()
			h.Route(tt.path, tt.method)
		}()
	}
}
