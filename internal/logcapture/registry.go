package logcapture

import (
	"sync"
	"time"
)

// registry holds the rotatingFile of every file path some Capture uses, so
// that all the Captures for a path (two Handles for the same module name
// and LogDir, by mistake or while one closes and the next starts) append to
// one file, whose writes and rotations are serialized, instead of two that
// rotate over each other. An entry lives from its path's first acquireFile
// to its last releaseFile.
var registry = struct {
	mu    sync.Mutex             // guards files and every sharedFile.users
	files map[string]*sharedFile // by absolute path; only paths in use
}{files: make(map[string]*sharedFile)}

// A sharedFile is a registry entry: one rotated file and its users.
type sharedFile struct {
	path  string        // fixed; its key in registry.files
	rf    *rotatingFile // fixed; safe for concurrent use
	users int           // guarded by registry.mu; Captures holding it
}

// acquireFile returns the shared file for path and counts the caller as a
// user, who must call releaseFile once. The call that creates the entry
// sets its maxSize (bytes) and maxBackups (0: all), and its open and now
// (nil: openAppend, time.Now); calls while the entry lives share it, and
// their settings are ignored.
func acquireFile(path string, maxSize int64, maxBackups int, open func(string) (file, error), now func() time.Time) *sharedFile {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	f := registry.files[path]
	if f == nil {
		f = &sharedFile{path: path, rf: newRotatingFile(path, maxSize, maxBackups, open, now)}
		registry.files[path] = f
	}
	f.users++
	return f
}

// releaseFile ends one use of f. After the last one it closes the file and
// removes the entry, so that nothing of it outlives its Captures.
func releaseFile(f *sharedFile) error {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	f.users--
	if f.users > 0 {
		return nil
	}
	delete(registry.files, f.path)
	return f.rf.Close()
}
