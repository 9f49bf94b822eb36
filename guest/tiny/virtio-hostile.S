/*
 * skiff's hostile virtio driver: a test kernel that drives the virtio-mmio devices
 * of slot 0 (virtio-rng, at 0xd0000000), slot 1 (a virtio-blk disk, 0xd0001000) and
 * slot 2 (a read-only disk, 0xd0002000), and a virtio-net and a virtio-vsock device
 * wherever they are, the way a broken or malicious guest would. A device that is not
 * there is skipped (skiff runs this kernel once with rng and the disks, once with
 * the network and vsock devices). Each case starts from a freshly reset
 * and initialised device, submits one bad thing, notifies, waits a bounded time and
 * records what the device did: a used entry (with the virtio-blk status byte) or
 * DEVICE_NEEDS_RESET. Then, after a reset if the device needed one, a good request
 * must still work (rng: random bytes; blk: a sector written and read back). One line
 * a case:
 *     virtio-hostile: <case> ok (<what the device did>)
 *     virtio-hostile: <case> FAIL: <why> [outcome, used len, status byte, Status]
 * and at the end "virtio-hostile: done N ok" (", M FAILED" when some failed), then
 * it powers off. tests/virtio.rs runs it with a 1 MiB disk and a 64 KiB read-only
 * one, and again with only a virtio-net device (on a TAP in a network namespace)
 * and a virtio-vsock device.
 *
 * What counts as handled: a malformed chain ends in an error completion (rng: used
 * length 0; blk: an error status, or no status when the status buffer itself is
 * unusable) or NEEDS_RESET with a config-change interrupt; a well-formed request the
 * disk cannot serve (sector past the end, unknown type) gets IOERR or UNSUPP; a bad
 * queue setup is refused (QueueReady stays 0), ends in NEEDS_RESET, or is ignored
 * with requests still answered. Never: a
 * success status, bytes written into a device-readable or out-of-RAM buffer, or no
 * answer at all.
 * PVH entry: 32-bit protected mode, paging off, CPL 0.
 */
        .set    SLOT0, 0xd0000000
        .set    SLOT1, 0xd0001000
        .set    SLOT2, 0xd0002000
        .set    BLK_F_RO, 1 << 5
        .set    GOOD_SECTOR, 7
        .set    BLK_IN, 0
        .set    BLK_OUT, 1
        .set    FILL, 0xa5a5a5a5        /* low-memory sentinel (wrapping addresses) */
        .set    START_INFO_MAGIC, 0x336ec578

        .code32
        .section .text
        .include "virtio.inc"           /* first: its macros are used below */

        .globl _start
_start:
        cli
        cld
        mov     $stack_top, %esp
        call    find_ramtop
        /* page 0 holds a pattern: a buffer address that wraps past 2^64 lands there */
        xor     %edi, %edi
        mov     $FILL, %eax
        mov     $1024, %ecx
        rep stosl
        mov     $s_hello, %esi
        call    puts

        movl    $4, want_id
        movl    $SLOT0, base
        call    find_slot
        test    %eax, %eax
        jnz     2f
        movl    $good_rng, good_fn
        mov     $n_rng_present, %esi
        call    probe
        test    %eax, %eax
        jnz     1f
        .irp    c, good, loop, next_oob, head_oob, chain_long, addr_f0, addr_top, addr_mmio, addr_wrap, addr_straddle, readable, ind_nested, ind_odd, ind_outside, ind_empty, avail_jump, qsize0, qsize3, qsize_big, rings_outside, used_outside, desc_straddle, live_ring_moved, queuesel_bad, notify_bad, features_unoffered, narrow_access
        mov     $n_rng_\c, %esi
        mov     $c_rng_\c, %edi
        call    run_case
        .endr
1:      call    vq_reset                /* quiet: the disk uses the same memory */
2:
        movl    $2, want_id
        movl    $SLOT1, base
        call    find_slot
        test    %eax, %eax
        jnz     2f
        movl    $good_blk, good_fn
        mov     $n_blk_present, %esi
        call    probe
        test    %eax, %eax
        jnz     1f
        RD      R_CONFIG                /* capacity, in 512-byte sectors */
        mov     %eax, cap
        RD      R_CONFIG + 4
        mov     %eax, cap + 4
        .irp    c, good, loop, chain_long, addr_f0, addr_top, addr_wrap, addr_straddle, datain_readable, status_readable, ind_nested, ind_odd, ind_outside, avail_jump, past_end, straddle_end, sector_huge, write_past_end, huge_len, write_huge_len, len_unaligned, unknown_type, header_short, no_status, rings_outside
        mov     $n_blk_\c, %esi
        mov     $c_blk_\c, %edi
        call    run_case
        .endr
1:      call    vq_reset
2:
        /* slot 2: a read-only disk whose every byte is 0x5a (tests/virtio.rs checks
           that none changed) */
        movl    $2, want_id
        movl    $BLK_F_RO, want_ro
        movl    $SLOT2, base
        call    find_slot
        test    %eax, %eax
        jnz     2f
        movl    $good_ro, good_fn
        mov     $n_ro_present, %esi
        call    probe
        test    %eax, %eax
        jnz     1f
        .irp    c, offers_ro, write, write_zeroes, discard
        mov     $n_ro_\c, %esi
        mov     $c_ro_\c, %edi
        call    run_case
        .endr
1:      call    vq_reset
2:
        /* virtio-net and virtio-vsock, wherever they are: two queues each */
        movl    $2, nq
        movl    $1, scan
        movl    $1, want_id
        call    find_slot
        test    %eax, %eax
        jnz     2f
        movl    $good_net, good_fn
        mov     $n_net_present, %esi
        call    probe
        test    %eax, %eax
        jnz     1f
        .irp    c, good, tx_loop, tx_hdr_short, tx_outside, tx_straddle, tx_writable, tx_ind_nested, tx_len_overflow, tx_too_long, tx_head_oob, rx_readable, rx_outside, rx_short
        mov     $n_net_\c, %esi
        mov     $c_net_\c, %edi
        call    run_case
        .endr
1:      call    vq_reset
2:
        movl    $19, want_id
        call    find_slot
        test    %eax, %eax
        jnz     2f
        movl    $good_vsock, good_fn
        mov     $n_vs_present, %esi
        call    probe
        test    %eax, %eax
        jnz     1f
        .irp    c, good, hdr_short, len_past, len_huge, type, op, dst_cid, src_cid, tx_writable, tx_loop, tx_outside, tx_ind_nested, rx_outside, rx_straddle, rx_readable, rx_short
        mov     $n_vs_\c, %esi
        mov     $c_vs_\c, %edi
        call    run_case
        .endr
1:      call    vq_reset
        /* the network device still works after all that happened to vsock */
        movl    $1, want_id
        call    find_slot
        test    %eax, %eax
        jnz     2f
        movl    $good_net, good_fn
        mov     $n_net_again, %esi
        mov     $c_net_good, %edi
        call    run_case
        call    vq_reset
2:      movl    $1, nq

        mov     $s_done, %esi
        call    puts
        mov     n_ok, %eax
        call    putdec
        mov     $s_ok_word, %esi
        call    puts
        cmpl    $0, n_fail
        je      1f
        mov     $s_comma, %esi
        call    puts
        mov     n_fail, %eax
        call    putdec
        mov     $s_failed_word, %esi
        call    puts
1:      call    newline
        mov     $0xf4, %dx              /* QEMU's isa-debug-exit (skiff ignores it) */
        xor     %eax, %eax
        out     %al, %dx
        mov     $0x604, %dx             /* ACPI PM1a_CNT: SLP_TYP=5, SLP_EN */
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
2:      hlt
        jmp     2b

/* find_slot: EAX = 0 when a virtio device of type want_id (a disk: offering
   VIRTIO_BLK_F_RO or not, as want_ro says) is at `base`, else 1 (the phase is
   skipped: its cases print nothing, so a test that expects them fails). skiff's slots
   are fixed for rng and the disks; with `scan` set (virtio-net, virtio-vsock) skiff's
   eight slots are searched and base set to the first match. Built with
   --defsym QEMU_MICROVM=1 the kernel always searches QEMU microvm's virtio-mmio
   slots, to check these cases against another implementation (QEMU needs
   -global virtio-mmio.force-legacy=false). */
find_slot:
        pusha
.ifdef QEMU_MICROVM
        mov     $0xfeb00000, %ebx
        mov     $0x200, %esi
        mov     $24, %edx
.else
        mov     base, %ebx
        mov     $1, %edx
        cmpl    $0, scan
        je      1f
        mov     $SLOT0, %ebx
        mov     $0x1000, %esi
        mov     $8, %edx
.endif
1:      call    slot_match
        je      3f
        add     %esi, %ebx
        dec     %edx
        jnz     1b
        popa
        mov     $1, %eax
        ret
3:      mov     %ebx, base
        popa
        xor     %eax, %eax
        ret

/* slot_match: ZF set when the virtio-mmio registers at EBX are want_id's device */
slot_match:
        pusha
        cmpl    $VIRTIO_MAGIC, R_MAGIC(%ebx)
        jne     9f
        mov     want_id, %eax
        cmp     %eax, R_DEVICE_ID(%ebx)
        jne     9f
        cmp     $2, %eax
        je      1f
        xor     %eax, %eax              /* ZF set: matched */
        jmp     9f
1:      movl    $0, R_DEV_FEAT_SEL(%ebx)
        mov     R_DEV_FEAT(%ebx), %eax
        and     $BLK_F_RO, %eax
        cmp     want_ro, %eax
9:      popa
        ret

/* find_ramtop: ramtop = the end of the PVH memory map's RAM entry holding 1 MiB
   (EBX = hvm_start_info); 0 when there is no map. */
find_ramtop:
        pusha
        movl    $0, ramtop
        cmpl    $START_INFO_MAGIC, (%ebx)
        jne     9f
        cmpl    $1, 4(%ebx)             /* the memory map came with version 1 */
        jb      9f
        mov     40(%ebx), %esi          /* memmap_paddr (below 4 GiB here) */
        mov     48(%ebx), %ecx          /* memmap_entries */
        cmp     $128, %ecx
        jbe     1f
        mov     $128, %ecx
1:      jecxz   9f
2:      cmpl    $1, 16(%esi)            /* type RAM */
        jne     3f
        cmpl    $0, 4(%esi)
        jne     3f
        mov     (%esi), %eax
        cmp     $0x100000, %eax
        ja      3f
        add     8(%esi), %eax           /* end, if it stays below 4 GiB */
        jc      3f
        cmpl    $0, 12(%esi)
        jne     3f
        cmp     $0x100000, %eax
        jbe     3f
        mov     %eax, ramtop
        jmp     9f
3:      add     $24, %esi
        loop    2b
9:      popa
        ret

/* case_head: prints "virtio-hostile: " and the name at ESI */
case_head:
        push    %esi
        mov     $s_prefix, %esi
        call    puts
        pop     %esi
        call    puts
        mov     $' ', %al
        call    putc
        ret

newline:
        mov     $'\n', %al
        call    putc
        ret

/* probe: the case "<dev>-present": the slot has a virtio device of type want_id
   that initialises. EAX = 0 when it does. */
probe:
        call    case_head
        RD      R_MAGIC
        cmp     $VIRTIO_MAGIC, %eax
        jne     1f
        RD      R_VERSION
        cmp     $2, %eax
        jne     1f
        RD      R_DEVICE_ID
        cmp     want_id, %eax
        jne     1f
        call    vq_defaults
        call    vq_init
        test    %eax, %eax
        jnz     2f
        mov     $s_ok_qmax, %esi
        call    puts
        mov     qmax, %eax
        call    putdec
        mov     $')', %al
        call    putc
        call    newline
        incl    n_ok
        xor     %eax, %eax
        ret
1:      mov     $f_absent, %esi
        call    puts
        RD      R_MAGIC
        call    puthex
        mov     $' ', %al
        call    putc
        RD      R_VERSION
        call    putdec
        mov     $' ', %al
        call    putc
        RD      R_DEVICE_ID
        call    putdec
        jmp     3f
2:      mov     $f_init, %esi
        call    puts
        call    putdec
3:      call    newline
        incl    n_fail
        mov     $1, %eax
        ret

/* run_case: ESI = name, EDI = the case. The case runs on a freshly initialised
   device and returns EAX = 0 (handled; `detail` may say how) or a reason string.
   Then a good request (good_fn) must work, after a re-initialisation when the case
   asked for one (reinit), got no answer, or left the device needing a reset. */
run_case:
        call    case_head
        movl    $0, detail
        movl    $0, reinit
        call    vq_defaults
        call    vq_init
        test    %eax, %eax
        jz      1f
        mov     $f_setup, %eax
        jmp     4f
1:      movl    $3, outcome             /* 3: the case submitted nothing */
        call    *%edi
        mov     %eax, verdict
        /* save what the device did before the good request overwrites it */
        mov     outcome, %eax
        mov     %eax, bad_outcome
        mov     u_len, %eax
        mov     %eax, bad_len
        movzbl  V_STAT, %eax
        mov     %eax, bad_stat
        RD      R_STATUS
        mov     %eax, bad_status
        test    $S_NEEDS_RESET, %eax
        jnz     2f
        cmpl    $0, reinit
        jne     2f
        cmpl    $0, bad_outcome         /* no answer, or a reset: start over */
        je      2f
        cmpl    $2, bad_outcome
        jne     3f
2:      call    vq_defaults
        call    vq_init
        test    %eax, %eax
        jz      3f
        mov     $f_recover, %eax
        jmp     4f
3:      call    *good_fn
        test    %eax, %eax
        jz      5f
4:      cmpl    $0, verdict             /* the first reason wins */
        jne     5f
        mov     %eax, verdict
5:      cmpl    $0, verdict
        jne     6f
        incl    n_ok
        mov     $s_ok, %esi
        call    puts
        mov     detail, %esi
        test    %esi, %esi
        jz      7f
        mov     $s_open, %esi
        call    puts
        mov     detail, %esi
        call    puts
        mov     $')', %al
        call    putc
        jmp     7f
6:      incl    n_fail
        mov     $s_fail, %esi
        call    puts
        mov     verdict, %esi
        call    puts
        mov     $s_dbg_outcome, %esi
        call    puts
        mov     bad_outcome, %eax
        call    putdec
        mov     $s_dbg_len, %esi
        call    puts
        mov     bad_len, %eax
        call    putdec
        mov     $s_dbg_stat, %esi
        call    puts
        mov     bad_stat, %eax
        call    putdec
        mov     $s_dbg_status, %esi
        call    puts
        mov     bad_status, %eax
        call    puthex
        mov     $']', %al
        call    putc
7:      call    newline
        ret

/* ---- verdicts: EAX = 0 (handled, detail set) or a reason; from outcome ---- */

/* rng: an error completion writes nothing (used length 0) */
v_rng_err:
        mov     outcome, %eax
        cmp     $2, %eax
        je      v_reset
        cmp     $1, %eax
        jne     v_noresp
        cmpl    $0, u_len
        jne     1f
        movl    $d_errcompl, detail
        xor     %eax, %eax
        ret
1:      mov     $f_wrote, %eax
        ret
v_noresp:
        mov     $f_noresp, %eax
        ret
/* NEEDS_RESET must come with the config-change interrupt (how a driver learns) */
v_reset:
        testl   $2, isr_seen
        jz      1f
        movl    $d_reset, detail
        xor     %eax, %eax
        ret
1:      mov     $f_noirq, %eax
        ret

/* blk, malformed chain: anything but a success status */
v_blk_err:
        mov     outcome, %eax
        cmp     $2, %eax
        je      v_reset
        cmp     $1, %eax
        jne     v_noresp
        movzbl  V_STAT, %eax
        cmp     $0xff, %eax
        jne     v_blk_status
        movl    $d_nostatus, detail
        xor     %eax, %eax
        ret
/* blk, well-formed request the disk cannot serve: IOERR or UNSUPP */
v_blk_ioerr:
        mov     outcome, %eax
        cmp     $2, %eax
        je      1f
        cmp     $1, %eax
        jne     v_noresp
        movzbl  V_STAT, %eax
        cmp     $0xff, %eax
        jne     v_blk_status
        mov     $f_nostatus, %eax
        ret
1:      mov     $f_resetnotio, %eax
        ret
/* the status byte EAX the device wrote */
v_blk_status:
        cmp     $1, %eax
        jne     1f
        movl    $d_ioerr, detail
        xor     %eax, %eax
        ret
1:      cmp     $2, %eax
        jne     2f
        movl    $d_unsupp, detail
        xor     %eax, %eax
        ret
2:      test    %eax, %eax
        jnz     3f
        mov     $f_statok, %eax
        ret
3:      mov     $f_garbage, %eax
        ret

/* a bad queue setup, EAX = vq_init's result: refused or NEEDS_RESET */
v_refused:
        movl    $1, reinit
        cmp     $5, %eax
        jne     1f
        movl    $d_refused, detail
        xor     %eax, %eax
        ret
1:      cmp     $6, %eax
        jne     2f
        movl    $d_reset, detail
        xor     %eax, %eax
        ret
2:      test    %eax, %eax
        jnz     3f
        mov     $f_accepted, %eax
        ret
3:      mov     $f_setup, %eax
        ret

/* check_low: ZF set when page 0 still holds the sentinel */
check_low:
        push    %eax
        push    %ecx
        push    %edi
        xor     %edi, %edi
        mov     $FILL, %eax
        mov     $1024, %ecx
        repe scasl
        pop     %edi
        pop     %ecx
        pop     %eax
        ret

/* submit_wait: submit head 0 and wait */
submit_wait:
        xor     %eax, %eax
        call    vq_submit
        call    vq_wait
        ret

        .include "virtio-hostile-rng.inc"
        .include "virtio-hostile-blk.inc"
        .include "virtio-hostile-ro.inc"
        .include "virtio-hostile-net.inc"
        .include "virtio-hostile-vsock.inc"
        .include "console.inc"

        .section .data
        .p2align 2
want_id:        .long   0
want_ro:        .long   0
scan:           .long   0
good_fn:        .long   0
ramtop:         .long   0
cap:            .quad   0
n_ok:           .long   0
n_fail:         .long   0
detail:         .long   0
reinit:         .long   0
verdict:        .long   0
bad_outcome:    .long   0
bad_len:        .long   0
bad_stat:       .long   0
bad_status:     .long   0
seq:            .long   0

        .section .rodata
s_hello:        .asciz  "virtio-hostile: start\n"
s_prefix:       .asciz  "virtio-hostile: "
s_done:         .asciz  "virtio-hostile: done "
s_ok_word:      .asciz  " ok"
s_comma:        .asciz  ", "
s_failed_word:  .asciz  " FAILED"
s_ok:           .asciz  "ok"
s_open:         .asciz  " ("
s_ok_qmax:      .asciz  "ok (QueueNumMax "
s_fail:         .asciz  "FAIL: "
s_dbg_outcome:  .asciz  " [outcome "
s_dbg_len:      .asciz  ", used len "
s_dbg_stat:     .asciz  ", status byte "
s_dbg_status:   .asciz  ", Status 0x"
d_errcompl:     .asciz  "error completion"
d_reset:        .asciz  "needs reset"
d_nostatus:     .asciz  "completed, no status"
d_ioerr:        .asciz  "IOERR"
d_unsupp:       .asciz  "UNSUPP"
d_refused:      .asciz  "refused"
d_ignored:      .asciz  "ignored"
d_bytes:        .asciz  "random bytes"
d_sector:       .asciz  "sector written and read back"
f_absent:       .asciz  "FAIL: no virtio device of the expected type here: magic, version, device "
f_init:         .asciz  "FAIL: initialisation failed at step "
f_setup:        .asciz  "initialising the device failed"
f_recover:      .asciz  "the device did not initialise again after the case"
f_noresp:       .asciz  "no answer (no used entry, no NEEDS_RESET)"
f_noirq:        .asciz  "NEEDS_RESET without a config-change interrupt"
f_wrote:        .asciz  "completed a bad buffer with data (used len not 0)"
f_statok:       .asciz  "completed with status OK"
f_garbage:      .asciz  "wrote a status byte that is not a virtio-blk status"
f_nostatus:     .asciz  "completed without writing the status byte"
f_resetnotio:   .asciz  "NEEDS_RESET for a well-formed request (expected IOERR)"
f_accepted:     .asciz  "accepted it (QueueReady reads 1, no NEEDS_RESET), then did not answer a request"
d_accepted:     .asciz  "accepted, then answered a request"
d_feat_ignored: .asciz  "accepted, and the ring works as before"
d_read_nothing: .asciz  "status OK, buffer untouched"
f_lowmem:       .asciz  "wrote guest memory at address 0 (an address that wrapped)"
f_readable:     .asciz  "wrote into a device-readable buffer"
f_jump:         .asciz  "used buffers from a ring whose avail index jumped ahead"
f_qmax_missing: .asciz  "a queue that does not exist has a QueueNumMax or is ready"
f_noram:        .asciz  "no RAM map from the PVH start info"
f_good_rng:     .asciz  "then a good rng request failed"
f_good_w:       .asciz  "then a good blk write failed"
f_good_r:       .asciz  "then a good blk read failed"
f_good_cmp:     .asciz  "then a sector read back differs from what was written"

        .section .bss
        .p2align 4
stack:  .skip   8192
stack_top:

        .include "pvh_note.inc"
