// Package logcapture copies a module's output streams (its structured log,
// its stdout and its stderr) from the child's pipes to their destinations in
// the parent: size-rotated files in a log directory, or the parent's stderr
// with every line prefixed by the module's name and its control characters
// escaped.
//
// The capture lives in the parent so that a child that crashes loses nothing
// it wrote, such as the Go runtime's panic trace on stderr. Every incarnation
// of a module appends to the same destinations, and the last lines are kept
// in memory for explaining why a module was found unhealthy. A destination
// that cannot be written to (a full disk) loses lines, never blocks the
// child, and is reported through Options.OnWriteError.
package logcapture

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// maxLine is the longest line Copy handles whole, and the size of its read
// buffer; a longer line is written in pieces of maxLine bytes.
const maxLine = 64 << 10

// defaultTailLines is the number of lines Tail keeps when
// Options.TailLines is 0.
const defaultTailLines = 20

// defaultMaxSize is the size in megabytes at which a file rotates when
// Options.MaxSize is 0.
const defaultMaxSize = 100

// reportInterval is the least time between two reports of failing writes
// to one stream, after the first.
const reportInterval = 10 * time.Second

// ErrClosed is returned by Copy when the Capture has been closed.
var ErrClosed = errors.New("logcapture: capture closed")

// Stream names one of a module's output streams.
type Stream int

const (
	Log Stream = iota // Env.Logger's records: <Dir>/<Name>.log
	Out               // the module's stdout:  <Dir>/<Name>.out
	Err               // the module's stderr:  <Dir>/<Name>.err
)

var streamNames = [...]string{Log: "log", Out: "out", Err: "err"}

// String returns "log", "out" or "err", which is also the stream's file
// extension.
func (s Stream) String() string {
	if s < 0 || int(s) >= len(streamNames) {
		return "Stream(" + strconv.Itoa(int(s)) + ")"
	}
	return streamNames[s]
}

// Options configures a Capture. The zero value of each field but Name has
// the meaning documented on it.
type Options struct {
	// Name is the module's name: the base name of its files in Dir, and the
	// line prefix "[<Name>] " when Dir is empty. It must not be empty and,
	// when Dir is set, must not contain a path separator.
	Name string

	// Dir is the directory of the module's files, created if missing. If
	// empty, the streams are written to Stderr instead, each line prefixed
	// with "[<Name>] ".
	Dir string

	// Stderr is the destination when Dir is empty; nil means os.Stderr.
	// Writes to it are serialized across all Captures, so it need not be
	// safe for concurrent use.
	Stderr io.Writer

	// MaxSize is the size in megabytes at which a file rotates; 0 means 100.
	// MaxBackups is the number of rotated files kept per stream; 0 means all.
	// Captures open at the same time for the same file path share one file
	// and the settings of the first of them.
	MaxSize    int
	MaxBackups int

	// TailLines is the number of lines Tail keeps; 0 means 20.
	TailLines int

	// OnWriteError, if not nil, is told when writes to a stream's
	// destination fail and when they work again; the lines that fail are
	// lost. It is called with a non-nil err at the first failure, then at
	// most once per 10 seconds while failures last, lost being the number
	// of lines (or pieces of long lines) lost since its previous call for
	// s; and with a nil err at the first write that succeeds after a
	// failure, lost being the number of lines lost since writes to s began
	// to fail. It is called from Copy, one call at a time per Capture: it
	// must return quickly, for the child waits meanwhile, and must not call
	// the Capture's methods.
	OnWriteError func(s Stream, err error, lost int)

	// Seams for tests, zero in production: openFile opens a file in file
	// mode (nil: openAppend), now tells the time (nil: time.Now).
	openFile func(path string) (file, error)
	now      func() time.Time
}

// A Capture copies one module's streams to their destinations, across all
// of the module's incarnations. Its methods are safe for concurrent use.
// Close must be called once the Capture is no longer needed.
type Capture struct {
	name         string                              // fixed
	prefix       string                              // fixed; "[<name>] " in prefix mode
	stderr       io.Writer                           // fixed; the destination in prefix mode, nil in file mode
	files        [3]*sharedFile                      // fixed; by Stream in file mode, nil in prefix mode
	onWriteError func(s Stream, err error, lost int) // fixed; Options.OnWriteError
	now          func() time.Time                    // fixed

	mu     sync.RWMutex // held for reading by each write, for writing by Close
	closed bool         // guarded by mu

	failMu   sync.Mutex      // guards failures; held while onWriteError runs
	failures [3]failureState // by Stream

	tailLines int     // fixed; Options.TailLines, defaulted
	def       *Source // fixed; the unlabelled source of Copy and Tail
}

// A Source is one writer of a Capture's streams, such as one child process
// of a module: its lines go to the Capture's destinations, marked with its
// label, and it keeps its own last lines for Tail. Its methods are safe for
// concurrent use.
type Source struct {
	c          *Capture // fixed
	prefix     string   // fixed; what opens each line in prefix mode
	filePrefix string   // fixed; what opens each line in file mode

	tailMu sync.Mutex // guards the fields below
	tail   []string   // the last lines, a ring of cap(tail) entries
	next   int        // once tail is full, the index of its oldest line
}

// NewSource returns a source of c's streams whose lines are marked with
// label, so that the lines of several writers, interleaved whole, say which
// wrote each: in prefix mode a line opens with "[<Name> <label>] " instead
// of "[<Name>] ", in file mode with "[<label>] ". An empty label marks
// nothing, as Copy does.
func (c *Capture) NewSource(label string) *Source {
	s := &Source{c: c, prefix: c.prefix, tail: make([]string, 0, c.tailLines)}
	if label != "" {
		s.prefix = "[" + c.name + " " + label + "] "
		s.filePrefix = "[" + label + "] "
	}
	return s
}

// A failureState is what a Capture knows of the failing writes to one
// stream, for Options.OnWriteError.
type failureState struct {
	failing  bool      // the last write failed
	reported time.Time // when the last failure was reported
	lost     int       // lines lost since the last report
	total    int       // lines lost since the last write that succeeded
}

// stderrMu serializes the writes of all Captures in prefix mode, so that
// Captures sharing a writer never interleave their lines.
var stderrMu sync.Mutex

// New returns a Capture for the module opts.Name. In file mode (opts.Dir
// set) it creates the directory and opens the three files, so that an
// unusable directory fails here rather than on the first line.
func New(opts Options) (*Capture, error) {
	if opts.Name == "" {
		return nil, errors.New("logcapture: empty module name")
	}
	if opts.MaxSize < 0 || opts.MaxBackups < 0 || opts.TailLines < 0 {
		return nil, fmt.Errorf("logcapture: module %q: MaxSize, MaxBackups and TailLines must not be negative", opts.Name)
	}
	tailLines := opts.TailLines
	if tailLines == 0 {
		tailLines = defaultTailLines
	}
	c := &Capture{
		name:         opts.Name,
		onWriteError: opts.OnWriteError,
		now:          opts.now,
		tailLines:    tailLines,
	}
	if c.now == nil {
		c.now = time.Now
	}

	if opts.Dir == "" {
		c.prefix = "[" + opts.Name + "] "
		c.stderr = opts.Stderr
		if c.stderr == nil {
			c.stderr = os.Stderr
		}
		c.def = c.NewSource("")
		return c, nil
	}
	c.def = c.NewSource("")

	if filepath.Base(opts.Name) != opts.Name {
		return nil, fmt.Errorf("logcapture: module %q: the name cannot be used as a file name in %q; choose a name without %q", opts.Name, opts.Dir, filepath.Separator)
	}
	dir, err := filepath.Abs(opts.Dir)
	if err == nil {
		err = os.MkdirAll(dir, 0o755)
	}
	if err != nil {
		return nil, fmt.Errorf("logcapture: module %q: cannot create log directory %q: %w", opts.Name, opts.Dir, err)
	}
	maxSize := opts.MaxSize
	if maxSize == 0 {
		maxSize = defaultMaxSize
	}
	for s := range c.files {
		path := filepath.Join(dir, opts.Name+"."+Stream(s).String())
		c.files[s] = acquireFile(path, int64(maxSize)*megabyte, opts.MaxBackups, opts.openFile, opts.now)
		if err := c.files[s].rf.Open(); err != nil {
			c.releaseFiles()
			return nil, fmt.Errorf("logcapture: module %q: cannot open log file in %q: %w", opts.Name, opts.Dir, err)
		}
	}
	return c, nil
}

// Copy copies r to stream s's destination, line by line, until r returns
// an error. At io.EOF it returns nil, or the first write error if a write
// failed; another read error it returns wrapped. Copy may be called
// concurrently for several streams and for several incarnations of the
// same stream.
//
// Copy buffers at most one line of 64 KiB per call; a longer line is copied
// in pieces of 64 KiB. In file mode the file receives r's bytes, each line or
// piece in one write, so concurrent calls for the same file interleave whole
// lines only (a piece of a long line may be followed by another call's
// line); a final line without a newline gets one at EOF, so that the next
// incarnation's output starts on a line of its own. In prefix mode each line
// or piece becomes one prefixed line, a newline added where it lacks one.
//
// In prefix mode each line's control characters are escaped (see
// appendEscaped), so that no line can move the terminal's cursor; files
// receive the bytes exactly.
//
// Copy keeps reading after a failed write, so that the child never blocks on
// a full pipe; the line is lost, Options.OnWriteError is told, and the next
// line is tried again, so that writing resumes once the destination works.
// After Close, Copy returns ErrClosed at the first line it reads. Every line
// read, written or not, is remembered for Tail.
func (c *Capture) Copy(s Stream, r io.Reader) error { return c.def.Copy(s, r) }

// Copy is Capture.Copy for the source's lines: see NewSource.
func (src *Source) Copy(s Stream, r io.Reader) error {
	c := src.c
	if s < Log || s > Err {
		return fmt.Errorf("logcapture: module %q: Copy of invalid %v", c.name, s)
	}
	br := bufio.NewReaderSize(r, maxLine)
	var buf []byte // prefix mode: the prefixed line being written
	var werr error // the first write error
	open := false  // the last bytes written end inside a line
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			open = line[len(line)-1] != '\n'
			src.remember(s, line)
			e := src.write(s, line, &buf)
			if e == ErrClosed {
				return e
			}
			c.account(s, e)
			if e != nil && werr == nil {
				werr = fmt.Errorf("logcapture: module %q: writing %v: %w", c.name, s, e)
			}
		}
		switch {
		case err == nil || err == bufio.ErrBufferFull:
			continue
		case err == io.EOF:
			if open && c.stderr == nil {
				// End the last line, so the next incarnation's output
				// starts on a line of its own.
				if e := src.write(s, []byte("\n"), &buf); e != nil && werr == nil {
					werr = fmt.Errorf("logcapture: module %q: writing %v: %w", c.name, s, e)
				}
			}
			return werr
		default:
			return errors.Join(werr, fmt.Errorf("logcapture: module %q: reading %v: %w", c.name, s, err))
		}
	}
}

// write writes one line, or piece of a line, to s's destination, using buf
// as scratch space in prefix mode.
func (src *Source) write(s Stream, line []byte, buf *[]byte) error {
	c := src.c
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closed {
		return ErrClosed
	}
	if c.stderr == nil {
		if src.filePrefix != "" {
			line = append(append((*buf)[:0], src.filePrefix...), line...)
			*buf = line
		}
		_, err := c.files[s].rf.Write(line)
		return err
	}
	b := append((*buf)[:0], src.prefix...)
	b = appendEscaped(b, bytes.TrimSuffix(line, []byte("\n")))
	b = append(b, '\n')
	*buf = b
	stderrMu.Lock()
	defer stderrMu.Unlock()
	_, err := c.stderr.Write(b)
	return err
}

// account records the outcome err of writing a line to s and reports to
// onWriteError as its documentation says.
func (c *Capture) account(s Stream, err error) {
	if c.onWriteError == nil {
		return
	}
	c.failMu.Lock()
	defer c.failMu.Unlock()
	st := &c.failures[s]
	if err == nil {
		if st.failing {
			total := st.total
			*st = failureState{}
			c.onWriteError(s, nil, total)
		}
		return
	}
	st.lost++
	st.total++
	now := c.now()
	if st.failing && now.Sub(st.reported) < reportInterval {
		return
	}
	lost := st.lost
	st.failing, st.reported, st.lost = true, now, 0
	c.onWriteError(s, err, lost)
}

// remember records line as the newest line for Tail.
func (c *Source) remember(s Stream, line []byte) {
	// Escaped: the lines end up in errors and logs that reach a terminal.
	text := string(appendEscaped(append([]byte(s.String()), ": "...), bytes.TrimSuffix(line, []byte("\n"))))
	c.tailMu.Lock()
	defer c.tailMu.Unlock()
	if len(c.tail) < cap(c.tail) {
		c.tail = append(c.tail, text)
		return
	}
	c.tail[c.next] = text
	c.next = (c.next + 1) % len(c.tail)
}

// Tail returns the last Options.TailLines lines Copy read from any stream,
// oldest first, each without its newline and prefixed with its stream, as in
// "err: panic: boom". A piece of a long line counts as a line. Control
// characters are escaped as in prefix mode, whatever the mode.
func (c *Capture) Tail() []string { return c.def.Tail() }

// Tail is Capture.Tail for the source's own lines.
func (c *Source) Tail() []string {
	c.tailMu.Lock()
	defer c.tailMu.Unlock()
	lines := make([]string, 0, len(c.tail))
	lines = append(lines, c.tail[c.next:]...)
	return append(lines, c.tail[:c.next]...)
}

// ResetTail forgets the lines remembered for Tail, so that Tail reports
// only what is read afterwards: call it when a new incarnation starts.
func (c *Capture) ResetTail() {
	s := c.def
	s.tailMu.Lock()
	defer s.tailMu.Unlock()
	s.tail = s.tail[:0]
	s.next = 0
}

// Close closes the Capture's files; a file shared with another live Capture
// for the same path stays open until that one closes too. Close waits for a
// line being written, not for Copy calls to return: a Copy still running
// returns ErrClosed at its next line. Tail remains usable. Closing a closed
// Capture does nothing.
func (c *Capture) Close() error {
	c.mu.Lock()
	closed := c.closed
	c.closed = true
	c.mu.Unlock()
	if closed {
		return nil
	}
	if err := c.releaseFiles(); err != nil {
		return fmt.Errorf("logcapture: module %q: %w", c.name, err)
	}
	return nil
}

// releaseFiles releases the files New acquired.
func (c *Capture) releaseFiles() error {
	var errs []error
	for _, f := range c.files {
		if f != nil {
			errs = append(errs, releaseFile(f))
		}
	}
	return errors.Join(errs...)
}
