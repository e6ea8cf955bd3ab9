package logcapture

import (
	"sync"

	"gopkg.in/natefinch/lumberjack.v2"
)

// registry holds one lumberjack.Logger per file path for the life of the
// process. A lumberjack.Logger starts a goroutine on its first write that
// never exits, even after Close, so a Logger is never discarded: every
// Capture for a path (the same module restarted, or a new Capture for the
// same Dir and Name) shares it. The file is closed when its last user
// releases it; the Logger reopens it on its next write.
var registry = struct {
	mu    sync.Mutex             // guards files and every sharedFile.users
	files map[string]*sharedFile // by absolute path; never removed
}{files: make(map[string]*sharedFile)}

// A sharedFile is a registry entry: one rotated file and its users.
type sharedFile struct {
	lj    *lumberjack.Logger // fixed; safe for concurrent use
	users int                // guarded by registry.mu; Captures holding it
}

// acquireFile returns the shared file for path and counts the caller as a
// user, who must call releaseFile once. The first call for a path in the
// process creates the Logger with maxSize and maxBackups; later calls share
// it and their settings are ignored.
func acquireFile(path string, maxSize, maxBackups int) *sharedFile {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	f := registry.files[path]
	if f == nil {
		f = &sharedFile{lj: &lumberjack.Logger{
			Filename:   path,
			MaxSize:    maxSize,
			MaxBackups: maxBackups,
		}}
		registry.files[path] = f
	}
	f.users++
	return f
}

// releaseFile ends one use of f and closes its file after the last one.
func releaseFile(f *sharedFile) error {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	f.users--
	if f.users > 0 {
		return nil
	}
	return f.lj.Close()
}
