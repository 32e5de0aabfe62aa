package main

import (
	"os"
	"testing"
)

// In production the terminal QR is drawn only on a terminal: piped output
// goes to log drains, where a code could be read and scanned by anyone.
func TestTerminalQROnlyWhereNoLogDrainReadsIt(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if terminalQR(true, w) != nil {
		t.Error("production draws the QR code into a pipe (a log drain)")
	}
	if terminalQR(false, w) == nil {
		t.Error("development does not draw the QR code")
	}
	// A pseudo-terminal is a terminal: an operator watching the process.
	ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("no pseudo-terminal to test with: %v", err)
	}
	defer ptmx.Close()
	if terminalQR(true, ptmx) == nil {
		t.Error("production on a terminal does not draw the QR code")
	}
}
