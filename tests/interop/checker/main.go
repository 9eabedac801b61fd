// Command checker is the interop oracle of ipfsnap's tests: it drives the reference eStargz
// library (github.com/containerd/stargz-snapshotter/estargz, as Debian ships it) to build
// blobs and to open, verify and read blobs, printing JSON that the Python tests compare.
//
// Sub-commands:
//
//	checker build -in TAR -out BLOB [-chunk-size N] [-level N] [-zstd] [-zstd-level N]
//	              [-prioritize PATH]... [-legacy] [-procs N]
//	    builds with estargz.Build and prints {tocDigest, diffID, blobDigest, blobSize}.
//	checker read -blob BLOB [-toc-digest D] [-no-verify]
//	    opens with estargz.Open (gzip, legacy and zstd:chunked), checks the TOC digest with
//	    VerifyTOC, reads every regular file chunk by chunk through the reference reader,
//	    checks each chunk against its verifier and prints one JSON line per path, then one
//	    summary line.
//	checker verify -blob BLOB [-toc-digest D]
//	    the same checks as read (every chunk of every file read and verified once), printing
//	    only the summary, without the whole-blob diffID pass: what the benchmark times.
//	checker toc -blob BLOB
//	    writes the blob's uncompressed TOC JSON, as the reference decompresses it, to stdout.
package main

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"sort"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

// legacyFooterLen is the size of the old stargz footer as Go's gzip writer emits it with
// NoCompression: 10-byte gzip header + 2-byte XLEN + 22 bytes of extra data (16 hex digits of
// the TOC offset, then "STARGZ") + a 5-byte empty stored block + the 8-byte CRC/size trailer.
const legacyFooterLen = 47

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	if len(os.Args) < 2 {
		fatalf("usage: checker build|read|toc [flags]")
	}
	var err error
	switch os.Args[1] {
	case "build":
		err = cmdBuild(os.Args[2:])
	case "read":
		err = cmdRead(os.Args[2:], false)
	case "verify":
		err = cmdRead(os.Args[2:], true)
	case "toc":
		err = cmdTOC(os.Args[2:])
	default:
		err = fmt.Errorf("unknown sub-command %q", os.Args[1])
	}
	if err != nil {
		fatalf("checker %s: %v", os.Args[1], err)
	}
}

func fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

// zstdCompression pairs the reference zstd:chunked compressor with its decompressor, which
// estargz.WithCompression needs (Build decompresses its own output to compute the diffID).
type zstdCompression struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}

func cmdBuild(args []string) error {
	fs := flag.NewFlagSet("build", flag.ExitOnError)
	in := fs.String("in", "", "input tar (plain or gzip)")
	out := fs.String("out", "", "output blob")
	chunkSize := fs.Int("chunk-size", 0, "chunk size in bytes (0 = library default)")
	level := fs.Int("level", gzip.BestCompression, "gzip compression level")
	useZstd := fs.Bool("zstd", false, "write zstd:chunked instead of gzip eStargz")
	// klauspost's levels: 1 fastest, 2 default (about zstd's level 3), 3 better, 4 best
	zstdLevel := fs.Int("zstd-level", int(zstd.SpeedDefault), "zstd encoder level (1..4)")
	legacy := fs.Bool("legacy", false, "replace the 51-byte footer by the legacy 47-byte one")
	procs := fs.Int("procs", 0, "GOMAXPROCS, which is also the number of parts Build splits into")
	var prio stringList
	fs.Var(&prio, "prioritize", "prioritized file (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *in == "" || *out == "" {
		return errors.New("-in and -out are required")
	}
	if *legacy && *useZstd {
		return errors.New("-legacy applies to gzip only")
	}
	if *procs > 0 {
		runtime.GOMAXPROCS(*procs)
	}
	f, err := os.Open(*in)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	opts := []estargz.Option{estargz.WithCompressionLevel(*level)}
	if *chunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(*chunkSize))
	}
	if len(prio) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(prio))
	}
	if *useZstd {
		opts = append(opts, estargz.WithCompression(&zstdCompression{
			&zstdchunked.Compressor{CompressionLevel: zstd.EncoderLevel(*zstdLevel)},
			&zstdchunked.Decompressor{},
		}))
	}
	blob, err := estargz.Build(io.NewSectionReader(f, 0, st.Size()), opts...)
	if err != nil {
		return err
	}
	defer blob.Close()
	var data bytes.Buffer
	if _, err := io.Copy(&data, blob); err != nil {
		return err
	}
	raw := data.Bytes()
	if *legacy {
		raw, err = toLegacyFooter(raw)
		if err != nil {
			return err
		}
	}
	if err := os.WriteFile(*out, raw, 0o644); err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"tocDigest":  blob.TOCDigest().String(),
		"diffID":     blob.DiffID().String(),
		"blobDigest": digest.FromBytes(raw).String(),
		"blobSize":   len(raw),
	})
}

// toLegacyFooter rewrites an eStargz blob into the pre-eStargz stargz layout. The two differ
// only in the footer: the legacy one puts "%016xSTARGZ" directly in the gzip FEXTRA field
// (no "SG" subfield header), which makes it 4 bytes shorter. The reference library can read
// that footer but no longer writes it, so it is rebuilt here.
func toLegacyFooter(blob []byte) ([]byte, error) {
	if len(blob) < estargz.FooterSize {
		return nil, errors.New("blob shorter than a footer")
	}
	tocOffset, _, err := estargz.OpenFooter(io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob))))
	if err != nil {
		return nil, err
	}
	var footer bytes.Buffer
	zw, err := gzip.NewWriterLevel(&footer, gzip.NoCompression)
	if err != nil {
		return nil, err
	}
	zw.Header.Extra = []byte(fmt.Sprintf("%016xSTARGZ", tocOffset))
	if err := zw.Close(); err != nil {
		return nil, err
	}
	if footer.Len() != legacyFooterLen {
		return nil, fmt.Errorf("legacy footer is %d bytes, want %d", footer.Len(), legacyFooterLen)
	}
	out := append([]byte{}, blob[:len(blob)-estargz.FooterSize]...)
	return append(out, footer.Bytes()...), nil
}

// entryLine is what `read` prints per path of the tree the reference reader exposes.
type entryLine struct {
	Path        string            `json:"path"`
	Name        string            `json:"name"`
	Type        string            `json:"type"`
	Size        int64             `json:"size"`
	Mode        int64             `json:"mode"`
	UID         int               `json:"uid"`
	GID         int               `json:"gid"`
	UserName    string            `json:"userName"`
	GroupName   string            `json:"groupName"`
	LinkName    string            `json:"linkName"`
	DevMajor    int               `json:"devMajor"`
	DevMinor    int               `json:"devMinor"`
	Xattrs      map[string][]byte `json:"xattrs"`
	ModTime     string            `json:"modtime"`
	NumLink     int               `json:"numLink"`
	Digest      string            `json:"digest"`
	ContentHash string            `json:"contentSha256,omitempty"`
	Chunks      int               `json:"chunks"`
}

type summaryLine struct {
	Summary          bool   `json:"summary"`
	TOCDigest        string `json:"tocDigest"`
	Paths            int    `json:"paths"`
	ChunksVerified   int    `json:"chunksVerified"`
	DiffID           string `json:"diffID"`
	UncompressedSize int64  `json:"uncompressedSize"`
}

func cmdRead(args []string, verifyOnly bool) error {
	fs := flag.NewFlagSet("read", flag.ExitOnError)
	blobPath := fs.String("blob", "", "blob to read")
	tocDigest := fs.String("toc-digest", "", "expected TOC digest (checked with VerifyTOC)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *blobPath == "" {
		return errors.New("-blob is required")
	}
	f, err := os.Open(*blobPath)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	sr := io.NewSectionReader(f, 0, st.Size())
	r, err := estargz.Open(sr, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	var ver estargz.TOCEntryVerifier
	if *tocDigest != "" {
		d, err := digest.Parse(*tocDigest)
		if err != nil {
			return err
		}
		ver, err = r.VerifyTOC(d)
		if err != nil {
			return fmt.Errorf("VerifyTOC: %w", err)
		}
	} else {
		ver, err = r.Verifiers()
		if err != nil {
			return fmt.Errorf("Verifiers: %w", err)
		}
	}

	root, ok := r.Lookup("")
	if !ok {
		return errors.New("no root directory")
	}
	enc := json.NewEncoder(os.Stdout)
	sum := summaryLine{Summary: true, TOCDigest: r.TOCDigest().String()}
	done := map[string]bool{} // in verify mode, each file (not each hardlink name) once
	var walk func(p string, e *estargz.TOCEntry) error
	walk = func(p string, e *estargz.TOCEntry) error {
		line := entryLine{
			Path: p, Name: e.Name, Type: e.Type, Size: e.Size, Mode: e.Mode,
			UID: e.UID, GID: e.GID, UserName: e.Uname, GroupName: e.Gname,
			LinkName: e.LinkName, DevMajor: e.DevMajor, DevMinor: e.DevMinor,
			Xattrs: e.Xattrs, ModTime: e.ModTime3339, NumLink: e.NumLink, Digest: e.Digest,
		}
		if e.Type == "reg" && !(verifyOnly && done[e.Name]) {
			done[e.Name] = true
			// Read through the entry's own name: for a hardlink the walk hands over the
			// target entry, and the reference's ChunkEntryForOffset only knows the chunks
			// under the target's name.
			h, n, err := readVerified(r, ver, e.Name, e)
			if err != nil {
				return err
			}
			line.ContentHash = h
			line.Chunks = n
			sum.ChunksVerified += n
		}
		if !verifyOnly {
			if err := enc.Encode(&line); err != nil {
				return err
			}
		}
		sum.Paths++
		if e.Type != "dir" {
			return nil
		}
		var names []string
		e.ForeachChild(func(base string, _ *estargz.TOCEntry) bool {
			names = append(names, base)
			return true
		})
		sort.Strings(names)
		for _, base := range names {
			child, _ := e.LookupChild(base)
			if err := walk(path.Join(p, base), child); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk("", root); err != nil {
		return err
	}
	if !verifyOnly {
		sum.DiffID, sum.UncompressedSize, err = diffID(sr, r)
		if err != nil {
			return err
		}
	}
	return enc.Encode(&sum)
}

// readVerified reads a regular file chunk by chunk through the reference's OpenFile/ReadAt,
// checking each chunk with the verifier the snapshotter would use, and returns the sha256
// of the whole content and the number of chunks.
func readVerified(r *estargz.Reader, ver estargz.TOCEntryVerifier, p string, e *estargz.TOCEntry) (string, int, error) {
	fr, err := r.OpenFile(p)
	if err != nil {
		return "", 0, err
	}
	whole := sha256.New()
	n := 0
	for off := int64(0); off < e.Size; {
		ce, ok := r.ChunkEntryForOffset(p, off)
		if !ok {
			return "", 0, fmt.Errorf("%s: no chunk at offset %d", p, off)
		}
		if ce.ChunkOffset != off || ce.ChunkSize <= 0 {
			return "", 0, fmt.Errorf("%s: chunk at %d has offset %d size %d", p, off, ce.ChunkOffset, ce.ChunkSize)
		}
		buf := make([]byte, ce.ChunkSize)
		if _, err := fr.ReadAt(buf, ce.ChunkOffset); err != nil && !(errors.Is(err, io.EOF) && ce.ChunkOffset+ce.ChunkSize == e.Size) {
			return "", 0, fmt.Errorf("%s: read chunk at %d: %w", p, off, err)
		}
		v, err := ver.Verifier(ce)
		if err != nil {
			return "", 0, fmt.Errorf("%s: chunk at %d: %w", p, off, err)
		}
		if _, err := v.Write(buf); err != nil {
			return "", 0, err
		}
		if !v.Verified() {
			return "", 0, fmt.Errorf("%s: chunk at %d does not match its digest", p, off)
		}
		whole.Write(buf)
		off += ce.ChunkSize
		n++
	}
	return hex.EncodeToString(whole.Sum(nil)), n, nil
}

// diffID decompresses the whole blob with the decompressor the reference picked for it.
func diffID(sr *io.SectionReader, r *estargz.Reader) (string, int64, error) {
	var dr io.Reader
	if _, _, err := estargz.OpenFooter(sr); err == nil {
		zr, err := gzip.NewReader(io.NewSectionReader(sr, 0, sr.Size()))
		if err != nil {
			return "", 0, err
		}
		defer zr.Close()
		dr = zr
	} else {
		zr, err := zstd.NewReader(io.NewSectionReader(sr, 0, sr.Size()))
		if err != nil {
			return "", 0, err
		}
		defer zr.Close()
		dr = zr
	}
	h := sha256.New()
	n, err := io.Copy(h, dr)
	if err != nil {
		return "", 0, fmt.Errorf("decompressing the whole blob: %w", err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), n, nil
}

// tocDecompressor is the part of the reference decompressors that extracts the TOC JSON
// (each of them has the method, the Decompressor interface of this version does not).
type tocDecompressor interface {
	estargz.Decompressor
	DecompressTOC(r io.Reader) (io.ReadCloser, error)
}

func cmdTOC(args []string) error {
	fs := flag.NewFlagSet("toc", flag.ExitOnError)
	blobPath := fs.String("blob", "", "blob")
	if err := fs.Parse(args); err != nil {
		return err
	}
	data, err := os.ReadFile(*blobPath)
	if err != nil {
		return err
	}
	var errs []string
	for _, d := range []tocDecompressor{
		new(estargz.GzipDecompressor), new(estargz.LegacyGzipDecompressor), new(zstdchunked.Decompressor),
	} {
		fsz := d.FooterSize()
		if int64(len(data)) < fsz {
			continue
		}
		_, tocOff, tocSize, err := d.ParseFooter(data[int64(len(data))-fsz:])
		if err != nil {
			errs = append(errs, err.Error())
			continue
		}
		if tocSize <= 0 {
			tocSize = int64(len(data)) - tocOff - fsz
		}
		if tocOff < 0 || tocSize < 0 || tocOff+tocSize > int64(len(data)) {
			errs = append(errs, "footer points outside the blob")
			continue
		}
		rc, err := d.DecompressTOC(bytes.NewReader(data[tocOff : tocOff+tocSize]))
		if err != nil {
			errs = append(errs, err.Error())
			continue
		}
		defer rc.Close()
		_, err = io.Copy(os.Stdout, rc)
		return err
	}
	return fmt.Errorf("no footer recognised: %s", strings.Join(errs, "; "))
}
