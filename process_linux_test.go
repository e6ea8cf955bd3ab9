package subproc

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestDropFileMappings checks that dropFileMappings takes the pages of the
// program's binary out of the resident set, and that it keeps the pages of
// a read-only mapping that were modified before it was made read-only (as
// the dynamic loader does with relocations): dropping those would bring
// back the file's bytes.
func TestDropFileMappings(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mapped")
	require.NoError(t, os.WriteFile(path, make([]byte, 1<<16), 0o600))
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	// A private mapping, written, then made read-only: "relocated".
	m, err := syscall.Mmap(int(f.Fd()), 0, 1<<16, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE)
	require.NoError(t, err)
	defer syscall.Munmap(m)
	for i := range m {
		m[i] = byte(i%251) + 1
	}
	require.NoError(t, syscall.Mprotect(m, syscall.PROT_READ))

	before := statusKB(t, "RssFile:")
	dropFileMappings()
	after := statusKB(t, "RssFile:")
	t.Logf("RssFile: %d kB before, %d kB after", before, after)
	require.Less(t, after, before/2, "the binary's pages are still resident")

	for i := range m {
		if m[i] != byte(i%251)+1 {
			t.Fatalf("byte %d of the modified read-only mapping is %d after dropFileMappings, want %d: its changes were dropped", i, m[i], byte(i%251)+1)
		}
	}
}

// statusKB returns a "kB" field of /proc/self/status.
func statusKB(t *testing.T, field string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	require.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			require.NoError(t, err)
			return n
		}
	}
	t.Fatalf("no %s in /proc/self/status", field)
	return 0
}
