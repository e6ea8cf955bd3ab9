package subproc

import (
	"bufio"
	"os"
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

// dropFileMappings unmaps, from this process's page tables, the pages of
// the read-only file mappings (the program's text and read-only data, and
// those of shared libraries) that are resident and unmodified, so that the
// process's resident set no longer counts them; they stay in the page
// cache, and what the process runs next faults back in (a minor fault per
// 64 KiB or so, with no I/O). A re-executed program has run every
// package's init function before Main, touching most of its binary: the
// watcher, which goes on to run a few hundred bytes of code, calls it once
// it is ready, and a child once its module is initialized, so that its
// resident memory, which MemoryHigh and MemoryMax bound, is what the
// module uses.
//
// A mapping that holds any modified (anonymous) page, such as a region the
// dynamic loader relocated and then made read-only, is left alone:
// dropping its pages would undo the changes. So are writable mappings and
// those of devices.
func dropFileMappings() {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return
	}
	defer f.Close()
	var start, end uintptr
	drop := false // the mapping being read is a candidate
	flush := func() {
		if drop && end > start {
			syscall.Syscall(syscall.SYS_MADVISE, start, end-start, syscall.MADV_DONTNEED)
		}
		drop = false
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if lo, hi, ok := strings.Cut(fields[0], "-"); ok && !strings.HasSuffix(fields[0], ":") {
			// A mapping's first line: "start-end perms offset dev inode path".
			flush()
			s, err1 := strconv.ParseUint(lo, 16, 64)
			e, err2 := strconv.ParseUint(hi, 16, 64)
			if err1 != nil || err2 != nil || len(fields) < 6 {
				continue
			}
			start, end = uintptr(s), uintptr(e)
			perms, path := fields[1], fields[5]
			drop = strings.HasPrefix(path, "/") && !strings.HasPrefix(path, "/dev/") && !strings.Contains(perms, "w")
			continue
		}
		if fields[0] == "Anonymous:" && (len(fields) < 2 || fields[1] != "0") {
			drop = false
		}
	}
	flush()
}
