module github.com/fbbf71ac/subproc/examples/dashboard

go 1.26.0

require (
	github.com/fbbf71ac/subproc v0.0.0
	go.uber.org/goleak v1.3.0
)

require golang.org/x/sync v0.25.0 // indirect

replace (
	github.com/fbbf71ac/subproc => ../..
	github.com/fbbf71ac/subproc/prometheus => ../../prometheus
)
