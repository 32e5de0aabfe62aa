package incr

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// The WAL file format (https://sqlite.org/fileformat2.html#walformat): a 32-byte header, then frames of a 24-byte
// header and one page. A frame belongs to the current WAL when its salts equal the header's and its cumulative
// checksum follows from the frame before; a transaction is committed when its last frame (the one whose "database
// size" field is set) is valid. This is the rule SQLite's own recovery uses, so the pages read here up to the last
// valid commit frame are one committed state of the database.
const (
	walHeaderSize      = 32
	walFrameHeaderSize = 24
	walMagicLE         = 0x377f0682
	walMagicBE         = 0x377f0683
	walVersion         = 3007000
)

// walHeader is a parsed WAL header.
type walHeader struct {
	bigEndian bool
	pageSize  int
	ckptSeq   uint32
	salt1     uint32
	salt2     uint32
	cksum     [2]uint32
}

// walPos is how far the WAL has been read: the last frame of the last committed transaction shipped (frames are
// numbered from 1; 0 is the header), with the cumulative checksum there, in the WAL generation named by its salts.
// complete says the Capturer checkpointed the WAL up to exactly this frame: the next writer may restart the WAL
// (new salts), and nothing will have been lost when it does.
type walPos struct {
	known    bool
	salt1    uint32
	salt2    uint32
	ckptSeq  uint32
	frame    int64
	cksum    [2]uint32
	complete bool
}

// errWALLost means frames may have been written to the WAL and checkpointed away without being read: the next point
// must be found by comparing every page.
var errWALLost = errors.New("incr: lost track of the WAL")

// walScan is what a scan found: for each page written since the start position, the frame holding its newest
// committed version, and the database size in pages at the last commit.
type walScan struct {
	end      walPos
	pageSize int
	dbPages  int
	frames   map[uint32]int64 // pgno -> frame number
	total    int64            // valid frames in the WAL generation (for the checkpoint threshold)
}

func readWALHeader(f *os.File) (walHeader, bool, error) {
	var b [walHeaderSize]byte
	if _, err := f.ReadAt(b[:], 0); err != nil {
		if errors.Is(err, io.EOF) {
			return walHeader{}, false, nil // empty or truncated WAL: no frames
		}
		return walHeader{}, false, err
	}
	var h walHeader
	switch binary.BigEndian.Uint32(b[0:]) {
	case walMagicLE:
	case walMagicBE:
		h.bigEndian = true
	default:
		return walHeader{}, false, nil // not yet written (all zero) or garbage: SQLite treats it as empty too
	}
	if binary.BigEndian.Uint32(b[4:]) != walVersion {
		return walHeader{}, false, nil
	}
	h.pageSize = int(binary.BigEndian.Uint32(b[8:]))
	h.ckptSeq = binary.BigEndian.Uint32(b[12:])
	h.salt1 = binary.BigEndian.Uint32(b[16:])
	h.salt2 = binary.BigEndian.Uint32(b[20:])
	want := [2]uint32{binary.BigEndian.Uint32(b[24:]), binary.BigEndian.Uint32(b[28:])}
	h.cksum = walChecksum(h.bigEndian, b[:24], [2]uint32{})
	if h.cksum != want || h.pageSize < minPageSize || h.pageSize > maxPageSize || h.pageSize&(h.pageSize-1) != 0 {
		return walHeader{}, false, nil
	}
	return h, true, nil
}

// walChecksum is SQLite's walChecksumBytes: b's length is a multiple of 8.
func walChecksum(bigEndian bool, b []byte, s [2]uint32) [2]uint32 {
	s0, s1 := s[0], s[1]
	if bigEndian {
		for i := 0; i+8 <= len(b); i += 8 {
			s0 += binary.BigEndian.Uint32(b[i:]) + s1
			s1 += binary.BigEndian.Uint32(b[i+4:]) + s0
		}
	} else {
		for i := 0; i+8 <= len(b); i += 8 {
			s0 += binary.LittleEndian.Uint32(b[i:]) + s1
			s1 += binary.LittleEndian.Uint32(b[i+4:]) + s0
		}
	}
	return [2]uint32{s0, s1}
}

// scanWAL reads the committed frames after from, following the checksum chain. With from unknown it starts at the
// WAL's first frame (the caller then reads every page anyway and only needs the end position). It returns errWALLost
// when the WAL was restarted in a way that may have dropped frames after from.
func scanWAL(path string, from walPos) (walScan, error) {
	res := walScan{end: from, frames: make(map[uint32]int64)}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return emptyWAL(from)
	}
	if err != nil {
		return res, fmt.Errorf("open wal: %w", err)
	}
	defer f.Close()
	h, ok, err := readWALHeader(f)
	if err != nil {
		return res, fmt.Errorf("read wal header: %w", err)
	}
	if !ok {
		return emptyWAL(from)
	}
	res.pageSize = h.pageSize
	start := int64(0)
	cksum := h.cksum
	switch {
	case from.known && from.salt1 == h.salt1 && from.salt2 == h.salt2:
		start, cksum = from.frame, from.cksum
		res.end.complete = from.complete
	case !from.known, from.complete:
		// A first scan, or a new WAL generation after one we had read to its end and checkpointed (or that was
		// empty): nothing can have been dropped. Another connection's checkpoint cannot restart the WAL while the
		// Capturer's guard transaction is open, so this is the only way a new generation appears.
	default:
		return res, errWALLost
	}
	res.end = walPos{known: true, salt1: h.salt1, salt2: h.salt2, ckptSeq: h.ckptSeq, frame: start, cksum: cksum,
		complete: res.end.complete && start == from.frame}
	frameSize := int64(walFrameHeaderSize + h.pageSize)
	off := walHeaderSize + start*frameSize
	r := bufio.NewReaderSize(io.NewSectionReader(f, off, 1<<62), 1<<20)
	buf := make([]byte, frameSize)
	var pending []uint32
	for n := start + 1; ; n++ {
		if _, err := io.ReadFull(r, buf); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				break
			}
			return res, fmt.Errorf("read wal: %w", err)
		}
		if binary.BigEndian.Uint32(buf[8:]) != h.salt1 || binary.BigEndian.Uint32(buf[12:]) != h.salt2 {
			break
		}
		c := walChecksum(h.bigEndian, buf[:8], cksum)
		c = walChecksum(h.bigEndian, buf[walFrameHeaderSize:], c)
		if c[0] != binary.BigEndian.Uint32(buf[16:]) || c[1] != binary.BigEndian.Uint32(buf[20:]) {
			break
		}
		cksum = c
		pgno := binary.BigEndian.Uint32(buf[0:])
		if pgno == 0 {
			break
		}
		pending = append(pending, pgno)
		// Frame n holds pgno; it only counts once its transaction's commit frame is valid.
		if size := binary.BigEndian.Uint32(buf[4:]); size != 0 {
			first := n - int64(len(pending)) + 1
			for i, p := range pending {
				res.frames[p] = first + int64(i)
			}
			pending = pending[:0]
			res.dbPages = int(size)
			res.end.frame, res.end.cksum, res.end.complete = n, cksum, false
		}
	}
	res.total = res.end.frame
	return res, nil
}

// emptyWAL is the scan of a WAL with no valid header: no frames, everything is in the database file. Frames of a
// generation not read to its end would be gone.
func emptyWAL(from walPos) (walScan, error) {
	if from.known && !from.complete && from.frame > 0 {
		return walScan{end: from}, errWALLost
	}
	return walScan{end: walPos{known: true, complete: true}, frames: map[uint32]int64{}}, nil
}

// readFrame reads the page in frame n of the WAL into dst.
func readFrame(f *os.File, pageSize int, n int64, dst []byte) error {
	off := walHeaderSize + (n-1)*int64(walFrameHeaderSize+pageSize) + walFrameHeaderSize
	if _, err := f.ReadAt(dst[:pageSize], off); err != nil {
		return fmt.Errorf("read wal frame %d: %w", n, err)
	}
	return nil
}
