package subproc

import (
	"fmt"
	"iter"
	"net/http"
	"strings"
)

// This file holds Route's matching, and the parent's side of carrying the
// pattern a request matched, and its path values, to the child.
//
// Route matches with an http.ServeMux of one pattern, "METHOD path", rather
// than with a copy of ServeMux's rules: so the syntax it accepts, the
// panics on a bad pattern, the matching (wildcards, "{name...}", "{$}", a
// trailing slash, path cleaning and its redirects, HEAD for GET), the 404
// and the 405 with its Allow header are exactly ServeMux's, and the
// request's Pattern and path values are set as ServeMux sets them.

// routeHandler returns the handler Route returns: next behind a ServeMux
// that holds the one pattern made of method and path. It panics, naming
// the module, if ServeMux would panic on the pattern, if path does not
// begin with a slash (ServeMux would take what precedes the slash for a
// host), if method is not an HTTP token, or if it is a standard method not
// in upper case ("get": ServeMux accepts it, and it matches no request).
func routeHandler(module, path, method string, next http.Handler) http.Handler {
	bad := func(format string, args ...any) {
		panic(fmt.Sprintf("subproc: Route(%q, %q) for module %q: ", path, method, module) + fmt.Sprintf(format, args...))
	}
	if path == "" || path[0] != '/' {
		bad("the path must begin with a slash, as in %q", "/"+path)
	}
	pattern := path
	if method == "" {
		// Any method, as a ServeMux pattern without one.
		if strings.ContainsAny(path, " \t") {
			bad("a path with a space or tab needs a method: a ServeMux pattern without one cannot hold it")
		}
	} else {
		if !isToken(method) {
			bad("invalid method %q: a method is one HTTP token, such as %q", method, http.MethodGet)
		}
		if up := strings.ToUpper(method); up != method && isStandardMethod(up) {
			bad("invalid method %q: methods are case-sensitive; use %q", method, up)
		}
		pattern = method + " " + path
	}
	mux := http.NewServeMux()
	if err := muxHandle(mux, pattern, next); err != nil {
		bad("%v", err)
	}
	return mux
}

// muxHandle is mux.Handle(pattern, h), with its panic returned as an error.
func muxHandle(mux *http.ServeMux, pattern string, h http.Handler) (err error) {
	defer func() {
		if v := recover(); v != nil {
			if e, ok := v.(error); ok {
				err = e
			} else {
				err = fmt.Errorf("%v", v)
			}
		}
	}()
	mux.Handle(pattern, h)
	return nil
}

// isStandardMethod reports whether m is one of the methods net/http names.
func isStandardMethod(m string) bool {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodConnect, http.MethodOptions, http.MethodTrace:
		return true
	}
	return false
}

// isToken reports whether s is an HTTP token (RFC 9110, section 5.6.2),
// which is what a method is.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// patternWildcards yields the names of the wildcards of a ServeMux
// pattern, such as "id" and "rest" for "GET /x/{id}/{rest...}", in order:
// the names whose r.PathValue the pattern's match sets. It does not
// validate the pattern; a pattern ServeMux would reject may yield names
// that are not wildcards, whose PathValue is then simply "".
func patternWildcards(pattern string) iter.Seq[string] {
	return func(yield func(string) bool) {
		// A method has no slash, and a host no brace: the path begins
		// at the first slash.
		i := strings.IndexByte(pattern, '/')
		if i < 0 {
			return
		}
		for seg := range strings.SplitSeq(pattern[i+1:], "/") {
			name, ok := strings.CutPrefix(seg, "{")
			if !ok {
				continue
			}
			if name, ok = strings.CutSuffix(name, "}"); !ok {
				continue
			}
			name = strings.TrimSuffix(name, "...")
			if name == "" || name == "$" {
				continue
			}
			if !yield(name) {
				return
			}
		}
	}
}

// pathValues returns the pattern r matched, with ServeMux or Route, and
// its path values as name, value pairs, for the child's request; "" and
// nil if r matched none. Values set with r.SetPathValue under names that
// are not wildcards of r.Pattern cannot be listed, and stay behind.
func pathValues(r *http.Request) (pattern string, values []string) {
	if r.Pattern == "" {
		return "", nil
	}
	for name := range patternWildcards(r.Pattern) {
		values = append(values, name, r.PathValue(name))
	}
	return r.Pattern, values
}
