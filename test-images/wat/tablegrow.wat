;; tablegrow: makes the host allocate memory outside linear memory, for OOM-kill tests.
;;
;; Usage: tablegrow [MAX]
;;
;; Grows a funcref table 65,536 elements at a time until it holds at least MAX elements
;; (prints `reached N elements`, exits 0) or `table.grow` fails (prints `table.grow failed at
;; N elements`, exits 12); without MAX it grows until the table's 2^32 - 1 limit, the host's
;; limit or the OOM killer stops it. Prints `grown to N elements` every 1,048,576 elements.
;; A bad MAX prints a usage line on stderr and exits 2.
;;
;; Why a table: linear memory is what a host limits first (memgrow tests that), while a
;; table's elements live in the host's own heap (about 8 bytes each in wasmtime, so a step is
;; about 512 KiB and a report about 8 MiB). Every new element is a non-null reference to
;; $filler, so the host writes, and so commits, every byte it allocates.
;;
;; Written in WAT because Rust cannot emit table.grow on stable; scripts/build-test-images.sh
;; turns it into tablegrow.wasm with test-images/wat2wasm.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get"
    (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))

  ;; Linear memory, one page:
  ;;   0      iovec for fd_write (ptr, len)     8  nwritten
  ;;   16     argc                              20 argv buffer size
  ;;   32     digits scratch (20 bytes, filled from the end)
  ;;   128    the line being built (up to 384 bytes)
  ;;   512    message texts (data segments below)
  ;;   1024   argv pointers (up to 768)
  ;;   4096   argv strings (up to 61,440 bytes)
  (memory (export "memory") 1)
  (data (i32.const 512) "grown to ")          ;; 512, 9 bytes
  (data (i32.const 528) " elements")          ;; 528, 9 bytes
  (data (i32.const 544) "reached ")           ;; 544, 8 bytes
  (data (i32.const 560) "table.grow failed at ") ;; 560, 21 bytes
  (data (i32.const 592) "usage: tablegrow [MAX] (MAX: a number of table elements)") ;; 592, 56 bytes

  (global $line_len (mut i32) (i32.const 0))

  (table $t 0 funcref)
  (func $filler)
  (elem declare func $filler)

  ;; Appends `len` bytes at `ptr` to the line (which never outgrows its 384 bytes here).
  (func $append (param $ptr i32) (param $len i32)
    (memory.copy
      (i32.add (i32.const 128) (global.get $line_len))
      (local.get $ptr)
      (local.get $len))
    (global.set $line_len (i32.add (global.get $line_len) (local.get $len))))

  ;; Appends the decimal digits of an unsigned number.
  (func $append_num (param $n i64)
    (local $p i32)
    (local.set $p (i32.const 52))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $n) (i64.const 10)))))
      (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $n) (i64.const 0))))
    (call $append (local.get $p) (i32.sub (i32.const 52) (local.get $p))))

  ;; Writes the line and a newline to `fd`, then empties it. A failed write is ignored: the
  ;; exit code still tells the outcome.
  (func $emit (param $fd i32)
    (i32.store8 (i32.add (i32.const 128) (global.get $line_len)) (i32.const 10))
    (i32.store (i32.const 0) (i32.const 128))
    (i32.store (i32.const 4) (i32.add (global.get $line_len) (i32.const 1)))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
    (global.set $line_len (i32.const 0)))

  ;; `<prefix> N elements` on stdout.
  (func $report (param $prefix i32) (param $prefix_len i32) (param $n i64)
    (call $append (local.get $prefix) (local.get $prefix_len))
    (call $append_num (local.get $n))
    (call $append (i32.const 528) (i32.const 9))
    (call $emit (i32.const 1)))

  (func $usage
    (call $append (i32.const 592) (i32.const 56))
    (call $emit (i32.const 2))
    (call $proc_exit (i32.const 2))
    unreachable)

  ;; MAX from argv[1], or -1 when there is none.
  (func $max_arg (result i64)
    (local $p i32) (local $c i32) (local $n i64)
    (if (call $args_sizes_get (i32.const 16) (i32.const 20)) (then (call $usage)))
    (if (i32.lt_u (i32.load (i32.const 16)) (i32.const 2)) (then (return (i64.const -1))))
    (if (i32.or
          (i32.gt_u (i32.load (i32.const 16)) (i32.const 768))
          (i32.gt_u (i32.load (i32.const 20)) (i32.const 61440)))
      (then (call $usage)))
    (if (call $args_get (i32.const 1024) (i32.const 4096)) (then (call $usage)))
    (local.set $p (i32.load (i32.const 1028)))
    ;; An empty argument is not a number.
    (if (i32.eqz (i32.load8_u (local.get $p))) (then (call $usage)))
    (loop $digit
      (local.set $c (i32.load8_u (local.get $p)))
      (if (local.get $c)
        (then
          (if (i32.gt_u (i32.sub (local.get $c) (i32.const 48)) (i32.const 9))
            (then (call $usage)))
          ;; More than 10^15 elements is past any table: refuse rather than overflow.
          (if (i64.gt_u (local.get $n) (i64.const 100000000000000)) (then (call $usage)))
          (local.set $n
            (i64.add
              (i64.mul (local.get $n) (i64.const 10))
              (i64.extend_i32_u (i32.sub (local.get $c) (i32.const 48)))))
          (local.set $p (i32.add (local.get $p) (i32.const 1)))
          (br $digit))))
    (local.get $n))

  (func (export "_start")
    (local $max i64) (local $size i64)
    (local.set $max (call $max_arg))
    (loop $grow
      (local.set $size (i64.extend_i32_u (table.size $t)))
      (if (i32.and
            (i64.ge_s (local.get $max) (i64.const 0))
            (i64.ge_u (local.get $size) (local.get $max)))
        (then
          (call $report (i32.const 544) (i32.const 8) (local.get $size))
          (call $proc_exit (i32.const 0))
          unreachable))
      (if (i32.eq (table.grow $t (ref.func $filler) (i32.const 65536)) (i32.const -1))
        (then
          (call $report (i32.const 560) (i32.const 21) (local.get $size))
          (call $proc_exit (i32.const 12))
          unreachable))
      (local.set $size (i64.extend_i32_u (table.size $t)))
      (if (i64.eqz (i64.rem_u (local.get $size) (i64.const 1048576)))
        (then (call $report (i32.const 512) (i32.const 9) (local.get $size))))
      (br $grow)))
)
