module github.com/fbbf71ac/subproc/wstest

go 1.26.0

require (
	github.com/coder/websocket v1.8.14
	github.com/fbbf71ac/subproc v0.0.0
	github.com/gorilla/websocket v1.5.3
	go.uber.org/goleak v1.3.0
)

require golang.org/x/sync v0.25.0 // indirect

replace github.com/fbbf71ac/subproc => ../
