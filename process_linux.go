package subproc

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"
)

// sysProcAttr puts the child in its own process group, so that a terminal's
// Ctrl-C reaches only the parent, and has the kernel kill it if the thread
// that started it (see spawnLoop) dies. The signal is SIGKILL, which needs
// nothing of the child: it ends a stopped child, and one whose Go runtime is
// wedged and would never run a signal handler. The processes the module
// started are the watcher's job (see watcherConn).
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// awaitExit waits until the process pid, a child of this process, has
// exited, without reaping it, and reports whether it did so: the caller may
// then signal the process's group, as a zombie's pid is not reused.
func awaitExit(pid int) bool {
	const pPID = 1     // P_PID
	var info [128]byte // siginfo_t
	for {
		_, _, errno := syscall.Syscall6(syscall.SYS_WAITID, pPID, uintptr(pid), uintptr(unsafe.Pointer(&info[0])), syscall.WEXITED|syscall.WNOWAIT, 0, 0)
		if errno != syscall.EINTR {
			return errno == 0
		}
	}
}

// dup2 duplicates oldfd onto newfd.
func dup2(oldfd, newfd int) error {
	return syscall.Dup3(oldfd, newfd, 0)
}

// pipeSize is the capacity asked for the protocol's pipes. The default, 64
// KiB, holds two body chunks, so that a streaming sender blocks, and wakes
// its reader, every other chunk.
const pipeSize = 1 << 20

// growPipe raises the capacity of the pipe f belongs to, if the system
// allows; it is only an optimization.
func growPipe(f *os.File) {
	const fSetPipeSize = 1031 // F_SETPIPE_SZ
	sc, err := f.SyscallConn()
	if err != nil {
		return
	}
	sc.Control(func(fd uintptr) {
		syscall.Syscall(syscall.SYS_FCNTL, fd, fSetPipeSize, pipeSize)
	})
}

// memoryFile returns an anonymous file in memory (memfd_create(2)) that
// can be sealed, or nil if the system cannot make one.
func memoryFile() *os.File {
	var sysMemfdCreate uintptr
	switch runtime.GOARCH {
	case "amd64":
		sysMemfdCreate = 319
	case "arm64", "riscv64", "loong64":
		sysMemfdCreate = 279
	default:
		return nil
	}
	const mfdCloexec, mfdAllowSealing = 1, 2
	name := []byte("subproc-shared\x00")
	fd, _, errno := syscall.Syscall(sysMemfdCreate, uintptr(unsafe.Pointer(&name[0])), mfdCloexec|mfdAllowSealing, 0)
	if errno != 0 {
		return nil
	}
	return os.NewFile(fd, "subproc-shared")
}

// sealSize forbids f, a file from memoryFile, to shrink, and itself to get
// more seals, so that a child that truncated it could not make the parent's
// next access to the mapping fault (SIGBUS); it reports whether it could. A
// file from elsewhere cannot be sealed.
func sealSize(f *os.File) bool {
	const fAddSeals, fSealSeal, fSealShrink = 1033, 1, 2
	_, _, errno := syscall.Syscall(syscall.SYS_FCNTL, f.Fd(), fAddSeals, fSealSeal|fSealShrink)
	return errno == 0
}

// allocateRing extends the shared file f, of one page and sealed against
// shrinking (see sealSize), to hold two bodyRings after its page (see
// sharedSize), and reports whether it did. A sealed file is a memfd, whose
// pages are memory, allocated as they are first touched (so rings that
// are never used cost nothing), and not bounded by a file system's size:
// a store into a slot cannot fail with SIGBUS.
func allocateRing(f *os.File) bool {
	return f.Truncate(sharedSize()) == nil
}

// dropFileMappings unmaps, from this process's page tables, the pages of
// the program's binary (its text and read-only data; with everyFile, those
// of every file, shared libraries included) that are resident and
// unmodified, so that the process's resident set no longer counts them;
// they stay in the page cache, and what the process runs next faults back
// in (a minor fault per 64 KiB or so, with no I/O). A re-executed program
// has run every package's init function before Main, touching most of its
// binary: the watcher, which goes on to run a few hundred bytes of code,
// calls it once it is ready, with everyFile, and a child once its module
// is initialized, so that its resident memory, which MemoryHigh and
// MemoryMax bound, is mostly what the module uses.
//
// A child drops only the binary's own mappings: the module's code, which
// may run meanwhile, does not map or unmap them, nor make them writable
// (but to patch its own code); in the watcher no other code runs. See
// cleanMappings for the pages it keeps.
func dropFileMappings(everyFile bool) {
	if everyFile {
		dropMappings(func(path string) bool { return strings.HasPrefix(path, "/") })
		return
	}
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return
	}
	dropMappings(func(path string) bool { return path == exe })
}

// dropMappings drops the pages of this process's clean mappings (see
// cleanMappings) of the files for which isFile(path) is true.
func dropMappings(isFile func(path string) bool) {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return
	}
	ms := cleanMappings(f, isFile)
	f.Close()
	for _, m := range ms {
		syscall.Syscall(syscall.SYS_MADVISE, m.start, m.end-m.start, syscall.MADV_DONTNEED)
	}
}

// A mapping is a range of the address space, [start, end).
type mapping struct{ start, end uintptr }

// cleanMappings returns the mappings listed in smaps (in the format of
// /proc/self/smaps) that are not writable, map a file for which
// isFile(path) is true, and hold no page that the process modified: none
// anonymous (a private copy of a file page, such as those of a region the
// dynamic loader relocated and then made read-only), none swapped out
// (such a copy that was), none of huge pages; and that are not locked or
// of a device. Dropping the pages of any other mapping could lose data.
func cleanMappings(smaps io.Reader, isFile func(path string) bool) []mapping {
	var ms []mapping
	var cur mapping
	ok := false // cur is a candidate
	flush := func() {
		if ok && cur.end > cur.start {
			ms = append(ms, cur)
		}
		ok = false
	}
	sc := bufio.NewScanner(smaps)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if lo, hi, isRange := strings.Cut(fields[0], "-"); isRange && !strings.HasSuffix(fields[0], ":") {
			// A mapping's first line: "start-end perms offset dev inode path".
			flush()
			s, err1 := strconv.ParseUint(lo, 16, 64)
			e, err2 := strconv.ParseUint(hi, 16, 64)
			if err1 != nil || err2 != nil || len(fields) < 6 {
				continue
			}
			cur = mapping{uintptr(s), uintptr(e)}
			ok = !strings.Contains(fields[1], "w") && isFile(mappedPath(line))
			continue
		}
		switch fields[0] {
		case "Anonymous:", "Swap:", "Private_Hugetlb:", "Shared_Hugetlb:", "Locked:":
			// (Not Private_Dirty: a file page is dirty until the file's
			// writes reach the disk, as a binary just built is.)
			if len(fields) < 2 || fields[1] != "0" {
				ok = false
			}
		case "VmFlags:":
			for _, fl := range fields[1:] {
				switch fl {
				case "ht", "io", "pf", "lo", "dd":
					// Huge pages, I/O or raw page frames, locked, or not
					// to be dumped: not ordinary file pages.
					ok = false
				}
			}
		}
	}
	flush()
	return ms
}

// mappedPath returns the path at the end of a mapping's first line in
// /proc/self/smaps, after its five other fields; it may hold spaces.
func mappedPath(line string) string {
	rest := line
	for range 5 {
		rest = strings.TrimLeft(rest, " \t")
		i := strings.IndexAny(rest, " \t")
		if i < 0 {
			return ""
		}
		rest = rest[i:]
	}
	return strings.TrimLeft(rest, " \t")
}

// inheritedFDs describes this process's file descriptors, from 3 up, that a
// process it starts inherits though nobody passes them: those without
// close-on-exec. Go opens none, but a process can get them from its own
// parent (a socket-activation listener, a shell's redirection) or from C
// code. Each is "fd:dev:inode", the list comma-separated; "" if there are
// none.
func inheritedFDs() string {
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return ""
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	var b strings.Builder
	for _, name := range names {
		fd, err := strconv.Atoi(name)
		if err != nil || fd < 3 {
			continue
		}
		dev, ino, ok := inheritable(fd)
		if !ok {
			continue // close-on-exec, closed since, or the directory read above
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%d:%d:%d", fd, dev, ino)
	}
	return b.String()
}

// inheritable reports whether fd is open without close-on-exec, and the
// device and inode of its file if it is.
func inheritable(fd int) (dev, ino uint64, ok bool) {
	flags, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_GETFD, 0)
	var st syscall.Stat_t
	if errno != 0 || flags&syscall.FD_CLOEXEC != 0 || syscall.Fstat(fd, &st) != nil {
		return 0, 0, false
	}
	return uint64(st.Dev), uint64(st.Ino), true
}

// closeInheritedFDs closes, in a child or the watcher, the file descriptors
// that spec (the parent's inheritedFDs) names and that are still the files
// it named, without close-on-exec: not those the exec put in their place
// (fds 3 to 5 are the protocol's), nor those a package's init opened since
// under a number the parent freed meanwhile, which are other files.
func closeInheritedFDs(spec string) {
	for item := range strings.SplitSeq(spec, ",") {
		var fd int
		var dev, ino uint64
		if _, err := fmt.Sscanf(item, "%d:%d:%d", &fd, &dev, &ino); err != nil || fd < 3 {
			continue
		}
		if d, i, ok := inheritable(fd); ok && d == dev && i == ino {
			syscall.Close(fd)
		}
	}
}
