package subproc

import (
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestDropFileMappings checks that dropFileMappings takes the pages of the
// program's binary out of the resident set, as a child does.
func TestDropFileMappings(t *testing.T) {
	before := statusKB(t, "RssFile:")
	dropFileMappings(false)
	after := statusKB(t, "RssFile:")
	t.Logf("RssFile: %d kB before, %d kB after", before, after)
	require.Less(t, after, before/2, "the binary's pages are still resident")
}

// TestDropMappingsKeepsModifiedPages drops the mappings of a file, two of
// them read-only: one clean, one written before it was made read-only (as
// the dynamic loader does with relocations). The clean one is dropped; the
// written one keeps its bytes, which dropping would have turned back into
// the file's.
func TestDropMappingsKeepsModifiedPages(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mapped")
	require.NoError(t, os.WriteFile(path, make([]byte, 1<<16), 0o600))
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	written, err := syscall.Mmap(int(f.Fd()), 0, 1<<16, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE)
	require.NoError(t, err)
	defer syscall.Munmap(written)
	for i := range written {
		written[i] = byte(i%251) + 1
	}
	require.NoError(t, syscall.Mprotect(written, syscall.PROT_READ))
	clean, err := syscall.Mmap(int(f.Fd()), 0, 1<<16, syscall.PROT_READ, syscall.MAP_PRIVATE)
	require.NoError(t, err)
	defer syscall.Munmap(clean)
	sum := 0
	for _, b := range clean {
		sum += int(b) // fault it in
	}
	require.Zero(t, sum)

	isFile := func(p string) bool { return p == path }
	smaps, err := os.Open("/proc/self/smaps")
	require.NoError(t, err)
	ms := cleanMappings(smaps, isFile)
	smaps.Close()
	require.Len(t, ms, 1, "clean mappings of the file: %v", ms)
	assert.Equal(t, addrOf(clean), ms[0].start, "the clean mapping is the one to drop")

	dropMappings(isFile)
	for i := range written {
		if written[i] != byte(i%251)+1 {
			t.Fatalf("byte %d of the modified read-only mapping is %d after dropMappings, want %d: its changes were dropped", i, written[i], byte(i%251)+1)
		}
	}
}

// TestCleanMappings checks which mappings of /proc/self/smaps's format
// cleanMappings picks: read-only mappings of the file whose every page is
// an unmodified page of it.
func TestCleanMappings(t *testing.T) {
	const exe = "/opt/my app/server"
	entry := func(rng, perms, path string, fields ...string) string {
		s := rng + " " + perms + " 00000000 fd:01 1234                       " + path + "\n"
		for _, f := range []string{"Size: 64 kB", "Rss: 64 kB", "Private_Clean: 64 kB", "Private_Dirty: 0 kB", "Anonymous: 0 kB", "Swap: 0 kB", "Private_Hugetlb: 0 kB", "Locked: 0 kB"} {
			k, _, _ := strings.Cut(f, ":")
			for _, o := range fields {
				if strings.HasPrefix(o, k+":") {
					f = o
				}
			}
			s += f + "\n"
		}
		flags := "VmFlags: rd ex mr mw me"
		for _, o := range fields {
			if strings.HasPrefix(o, "VmFlags:") {
				flags = o
			}
		}
		return s + flags + "\n"
	}
	smaps := entry("1000-2000", "r-xp", exe) + // text: dropped
		entry("2000-3000", "r--p", exe) + // read-only data: dropped
		entry("3000-4000", "r--p", exe, "Anonymous: 4 kB") + // relocated
		entry("4000-5000", "r--p", exe, "Swap: 8 kB") + // relocated, swapped out
		entry("5000-6000", "r--p", exe, "Private_Dirty: 4 kB") + // dirty in the page cache (just built): dropped
		entry("6000-7000", "rw-p", exe) + // data
		entry("7000-8000", "r--p", exe, "VmFlags: rd mr mw me ht") +
		entry("8000-9000", "r--p", exe, "Locked: 64 kB") +
		entry("9000-a000", "r--p", "/usr/lib/libc.so.6") + // another file
		entry("a000-b000", "r--p", "/opt/my app/server (deleted)") + // not the same path
		entry("b000-c000", "r--p", "") + // anonymous
		entry("c000-d000", "r-xp", exe)
	got := cleanMappings(strings.NewReader(smaps), func(p string) bool { return p == exe })
	assert.Equal(t, []mapping{{0x1000, 0x2000}, {0x2000, 0x3000}, {0x5000, 0x6000}, {0xc000, 0xd000}}, got)
}

// addrOf returns the address of b's first byte.
func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

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

// A child and the watcher get none of the parent's files but those Start
// gives them: descriptors the parent has without close-on-exec, which Go
// never opens but a process can inherit (here a listening socket, as
// socket activation passes one, and a file), stay the parent's alone. A
// module that inherited the parent's listener could accept its clients.
func TestChildInheritsNoStrayFiles(t *testing.T) {
	sock, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0) // no SOCK_CLOEXEC
	require.NoError(t, err)
	defer syscall.Close(sock)
	require.NoError(t, syscall.Bind(sock, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
	require.NoError(t, syscall.Listen(sock, 1))
	file, err := syscall.Open(filepath.Join(t.TempDir(), "stray"), syscall.O_RDWR|syscall.O_CREAT, 0o600) // no O_CLOEXEC
	require.NoError(t, err)
	defer syscall.Close(file)
	strays := map[string]int{}
	for _, fd := range []int{sock, file} {
		_, _, ok := inheritable(fd)
		require.True(t, ok, "fd %d has close-on-exec", fd)
		link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
		require.NoError(t, err)
		strays[link] = fd
	}
	// The parent lists its strays at its first start of a process (see
	// strayFDs), which an earlier test made: list them anew.
	defer func(cached func() string) { strayFDs = cached }(strayFDs)
	strayFDs = inheritedFDs
	openIn := func(pid int) []string {
		ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
		require.NoError(t, err)
		var found []string
		for _, e := range ents {
			if link, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/fd/" + e.Name()); err == nil {
				if _, ok := strays[link]; ok {
					found = append(found, e.Name()+" → "+link)
				}
			}
		}
		return found
	}

	// A watcher started now, as one is after its predecessor was killed.
	theWatcher.mu.Lock()
	if theWatcher.cmd != nil {
		theWatcher.dropLocked()
	}
	err = theWatcher.startLocked()
	theWatcher.mu.Unlock()
	require.NoError(t, err)

	h := startModule(t, "bench", Options{})
	status, _ := fetch(t, serve(t, h).URL+"/small")
	require.Equal(t, http.StatusOK, status, "the child serves")
	assert.Empty(t, openIn(firstChild(h).proc.Pid()), "the parent's stray files open in the child")
	assert.Empty(t, openIn(theWatcher.pid()), "the parent's stray files open in the watcher")
	for link, fd := range strays {
		_, _, ok := inheritable(fd)
		assert.True(t, ok, "the parent's fd %d (%s) was closed or changed", fd, link)
	}
	assert.Empty(t, os.Getenv(envInherited), "the parent's environment changed")
}

// maxPipeSize (contain_test.go) bounds pipeSize: this fails to compile
// if it does not.
const _ = uint(maxPipeSize - pipeSize)
