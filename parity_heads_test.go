package subproc

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestParityOddHeads(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprint("h2=", h2), func(t *testing.T) {
			tgs := parTargets(t, h2)
			paths := []string{"/1xx-after-body"} // (more than 32 1xx: README Limits)
			// (A 101 without a hijack over HTTP/2 is a 1xx in-process and
			// final through subproc: RFC 9113 forbids 101 there anyway.)
			for _, path := range paths {
				var vs []parView
				for _, tg := range tgs {
					vs = append(vs, parDo(tg, "GET", path, nil))
				}
				if len(vs[0].Infos) > 3 {
					t.Logf("%s: infos %d vs %d", path, len(vs[0].Infos), len(vs[1].Infos))
				}
				assert.Equal(t, vs[0], vs[1], "%s", path)
			}
		})
	}
}
