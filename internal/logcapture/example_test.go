package logcapture_test

import (
	"fmt"
	"os"
	"strings"

	"github.com/fbbf71ac/subproc/internal/logcapture"
)

func ExampleCapture() {
	c, err := logcapture.New(logcapture.Options{Name: "web", Stderr: os.Stdout})
	if err != nil {
		panic(err)
	}
	defer c.Close()

	// In the parent, r is the read end of the child's stderr pipe.
	r := strings.NewReader("listening\npanic: boom")
	if err := c.Copy(logcapture.Err, r); err != nil {
		panic(err)
	}
	fmt.Println(c.Tail())
	// Output:
	// [web] listening
	// [web] panic: boom
	// [err: listening err: panic: boom]
}
