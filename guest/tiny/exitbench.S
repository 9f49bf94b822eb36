/*
 * skiff's exit benchmark probe: what one exit of each kind costs, measured from inside
 * the guest, the same way under any VMM (skiff, QEMU, examples/kvm_floor.rs).
 *
 * Time base: the TSC, its rate calibrated against PIT channel 2 (a 1.193182 MHz
 * crystal every PC VMM has, in KVM's kernel under both skiff and QEMU):
 * two samples of (TSC, latched channel-2 count) at least 20 ms apart; the median of
 * 5 such calibrations, since a vCPU preempted between the two reads of a sample
 * skews that one.
 *
 * Each operation runs N times in a loop; the same loop without the operation (but
 * with any other instruction the operation needs) is timed just before it and
 * subtracted, since guest kernel mode may run through KVM's instruction emulator
 * (hundreds of ns an instruction). Both loops run REPS times, interleaved, and the
 * lowest time of each is used (noise only ever adds). Results, one line each on COM1:
 *
 *   exitbench: op=NAME n=N ns=NS.D ticks=T base_ticks=B
 *
 * with T the TSC ticks per operation after subtracting B, the loop's own ticks per
 * iteration. The PM timer's port comes from the FADT (RSDP in 0xe0000-0xfffff, then
 * the RSDT or XSDT); without one that operation says "skipped". Then it powers off:
 * QEMU's isa-debug-exit (0xf4), then ACPI PM1a_CNT (0x604, SLP_TYP=5, SLP_EN).
 * PVH entry: 32-bit protected mode, paging off, CPL 0.
 */
        .set    REPS, 5
        .set    UNCLAIMED_PORT, 0x2e0   /* no device in skiff or QEMU -M pc */
        .set    POST_PORT, 0x80
        .set    DOORBELL_PORT, 0x440    /* skiff's boot marker: an ioeventfd doorbell */
        .set    MMIO_ADDR, 0xdf000000   /* in the 32-bit MMIO hole, no device (virtio starts at 0xd0000000) */
        .set    PIT_HZ, 1193182
        .set    CAL_COUNT, 23864        /* 20 ms of PIT ticks */
        .set    CAL_RUNS, 5

/* TSC ticks per iteration of `body` (after `setup`) in EAX, saturated to 32 bits. */
.macro TIMED iters, setup, body
        mov     $\iters, %ebp
        rdtsc
        mov     %eax, t0
        mov     %edx, t0+4
        \setup
1001:
        \body
        dec     %ebp
        jnz     1001b
        rdtsc
        sub     t0, %eax
        sbb     t0+4, %edx
        mov     $\iters, %ecx
        call    div64
        test    %edx, %edx
        jz      1002f
        mov     $0xffffffff, %eax
1002:
.endm

/* Times `body` and `basebody` REPS times each, interleaved; reports the lowest time
 * of the one less the lowest of the other (noise only ever adds, to either). */
.macro OP name, iters, setup, body, basebody
        movl    $0xffffffff, best
        movl    $0xffffffff, best_base
        movl    $REPS, reps
2001:
        TIMED   \iters, "\setup", "\basebody"
        cmp     best_base, %eax
        jae     2002f
        mov     %eax, best_base
2002:
        TIMED   \iters, "\setup", "\body"
        cmp     best, %eax
        jae     2003f
        mov     %eax, best
2003:
        decl    reps
        jnz     2001b
        mov     best, %eax
        sub     best_base, %eax
        jae     2004f
        xor     %eax, %eax              /* no slower than the empty loop */
2004:
        mov     %eax, best
        mov     $\name, %esi
        mov     $\iters, %ecx
        call    report
.endm

        .code32
        .section .text
        .globl _start
_start:
        cli
        cld
        mov     $stack_top, %esp
        mov     $msg_start, %esi
        call    puts

        call    calibrate_median
        mov     $msg_tsc, %esi
        call    puts
        mov     tsc_khz, %eax
        call    putdec
        mov     $msg_tsc_how, %esi
        call    puts
        cmpl    $0, tsc_khz
        je      poweroff

        call    find_pm_timer
        mov     %eax, pm_port

        OP      name_cpuid, 2000, "xor %eax, %eax", "cpuid", ""
        OP      name_out_unclaimed, 1000, "mov $UNCLAIMED_PORT, %dx", "out %al, %dx", ""
        OP      name_out_post, 1000, "mov $POST_PORT, %dx", "out %al, %dx", ""
        OP      name_out_doorbell, 1000, "mov $DOORBELL_PORT, %dx", "out %al, %dx", ""
        cmpl    $0, pm_port
        je      1f
        OP      name_pm_read, 1000, "mov pm_port, %edx", "in %dx, %eax", ""
        jmp     2f
1:      mov     $msg_no_pm, %esi
        call    puts
2:
        OP      name_mmio_write, 1000, "", "movb %al, MMIO_ADDR", ""
        OP      name_rep_outsb, 4, "mov $UNCLAIMED_PORT, %dx", "mov $buf, %esi; mov $4096, %ecx; rep outsb", "mov $buf, %esi; mov $4096, %ecx"

        mov     $msg_done, %esi
        call    puts
poweroff:
        mov     $0xf4, %dx              /* QEMU isa-debug-exit */
        xor     %eax, %eax
        out     %al, %dx
        mov     $0x604, %dx             /* ACPI PM1a_CNT: SLP_TYP=5, SLP_EN */
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
3:      hlt
        jmp     3b

/* tsc_khz: the median of CAL_RUNS calibrations */
calibrate_median:
        xor     %edi, %edi
1:      call    calibrate
        mov     tsc_khz, %eax
        mov     %eax, cal_vals(,%edi,4)
        inc     %edi
        cmp     $CAL_RUNS, %edi
        jb      1b
        /* bubble sort, CAL_RUNS - 1 passes */
        mov     $(CAL_RUNS - 1), %ebx
2:      xor     %edi, %edi
3:      mov     cal_vals(,%edi,4), %eax
        mov     cal_vals+4(,%edi,4), %edx
        cmp     %edx, %eax
        jbe     4f
        mov     %edx, cal_vals(,%edi,4)
        mov     %eax, cal_vals+4(,%edi,4)
4:      inc     %edi
        cmp     $(CAL_RUNS - 1), %edi
        jb      3b
        dec     %ebx
        jnz     2b
        mov     cal_vals+(CAL_RUNS / 2) * 4, %eax
        mov     %eax, tsc_khz
        ret

/* tsc_khz from PIT channel 2 (0 if it never counts): two (TSC, PIT count) samples
 * at least CAL_COUNT PIT ticks apart. Each sample reads the TSC and latches the
 * count back to back, so a preempted vCPU skews a result only if preempted there. */
calibrate:
        in      $0x61, %al
        and     $0xfd, %al              /* speaker data off */
        or      $0x01, %al              /* gate 2 on */
        out     %al, $0x61
        mov     $0xb0, %al              /* channel 2, lobyte/hibyte, mode 0, binary */
        out     %al, $0x43
        mov     $0xff, %al              /* count 0xffff: 55 ms before it wraps */
        out     %al, $0x42
        out     %al, $0x42
        call    sample
        call    sample                  /* the first may precede the count's load */
        mov     t1, %eax
        mov     %eax, t0
        mov     t1+4, %eax
        mov     %eax, t0+4
        mov     %ebx, %esi              /* ESI = count at t0 */
        mov     $1000000, %ecx          /* bounded: a PIT that never counts */
1:      call    sample
        cmp     %esi, %ebx
        ja      calibrate               /* wrapped (preempted for 55 ms): again */
        mov     %esi, %eax
        sub     %ebx, %eax
        cmp     $CAL_COUNT, %eax
        jae     2f
        loop    1b
        movl    $0, tsc_khz
        ret
2:      /* kHz = dtsc * PIT_HZ / (dpit * 1000); dtsc < 2^32 for any sane TSC */
        imul    $1000, %eax, %ecx
        mov     t1, %eax
        sub     t0, %eax
        mov     $PIT_HZ, %edx
        mul     %edx
        call    div64
        mov     %eax, tsc_khz
        ret

/* EBX = PIT channel 2's count, latched right after reading the TSC into t1 */
sample:
        rdtsc
        mov     %eax, t1
        mov     %edx, t1+4
        mov     $0x80, %al              /* latch channel 2 */
        out     %al, $0x43
        in      $0x42, %al
        mov     %al, %bl
        in      $0x42, %al
        mov     %al, %bh
        movzwl  %bx, %ebx
        ret

/* EAX = the FADT's PM timer port, or 0 */
find_pm_timer:
        push    %esi
        push    %edi
        push    %ebx
        push    %ecx
        mov     $0xe0000, %esi
1:      cmpl    $0x20445352, (%esi)     /* "RSD " */
        jne     2f
        cmpl    $0x20525450, 4(%esi)    /* "PTR " */
        je      3f
2:      add     $16, %esi
        cmp     $0x100000, %esi
        jb      1b
        jmp     none
3:      /* XSDT if revision >= 2 and it lies below 4 GiB, else the RSDT */
        cmpb    $2, 15(%esi)
        jb      4f
        mov     24(%esi), %edi
        cmpl    $0, 28(%esi)
        jne     4f
        test    %edi, %edi
        jz      4f
        mov     $8, %ebx
        jmp     5f
4:      mov     16(%esi), %edi
        mov     $4, %ebx
        test    %edi, %edi
        jz      none
5:      /* EDI = table, EBX = entry size; entries from offset 36 */
        mov     4(%edi), %ecx
        sub     $36, %ecx
        jbe     none
        lea     36(%edi), %esi
        add     %esi, %ecx              /* ECX = end of entries */
        mov     $64, %edx               /* bounded walk */
6:      cmp     %ecx, %esi
        jae     none
        dec     %edx
        jz      none
        cmp     $4, %ebx
        je      7f
        cmpl    $0, 4(%esi)             /* 64-bit entry above 4 GiB: skip */
        jne     8f
7:      mov     (%esi), %edi
        cmpl    $0x50434146, (%edi)     /* "FACP" */
        je      9f
8:      add     %ebx, %esi
        jmp     6b
9:      mov     76(%edi), %eax          /* PM_TMR_BLK */
        and     $0xffff, %eax
        jnz     out
        cmpl    $220, 4(%edi)           /* else X_PM_TMR_BLK, if in system I/O space */
        jb      none
        cmpb    $1, 208(%edi)
        jne     none
        mov     212(%edi), %eax
        and     $0xffff, %eax
        jmp     out
none:   xor     %eax, %eax
out:    pop     %ecx
        pop     %ebx
        pop     %edi
        pop     %esi
        ret

/* EDX:EAX /= ECX (64-bit quotient, ECX != 0) */
div64:
        push    %ebx
        mov     %eax, %ebx
        mov     %edx, %eax
        xor     %edx, %edx
        div     %ecx
        xchg    %eax, %ebx
        div     %ecx
        mov     %ebx, %edx
        pop     %ebx
        ret

/* "exitbench: op=NAME n=N ns=X.Y ticks=T base_ticks=B\n"; ESI = name, ECX = N */
report:
        pusha
        push    %esi
        mov     $msg_op, %esi
        call    puts
        pop     %esi
        call    puts
        mov     $msg_n, %esi
        call    puts
        mov     %ecx, %eax
        call    putdec
        mov     $msg_ns, %esi
        call    puts
        /* tenths of ns = ticks * 10^7 / kHz */
        mov     best, %eax
        mov     $10000000, %ecx
        mul     %ecx
        mov     tsc_khz, %ecx
        call    div64
        test    %edx, %edx
        jz      1f
        mov     $0xffffffff, %eax
1:      xor     %edx, %edx
        mov     $10, %ecx
        div     %ecx
        call    putdec
        mov     $'.', %al
        call    putc
        mov     %edx, %eax
        call    putdec
        mov     $msg_ticks, %esi
        call    puts
        mov     best, %eax
        call    putdec
        mov     $msg_base, %esi
        call    puts
        mov     best_base, %eax
        call    putdec
        mov     $'\n', %al
        call    putc
        popa
        ret

        .include "console.inc"

        .section .rodata
msg_start:  .asciz "exitbench: start\n"
msg_tsc:    .asciz "exitbench: tsc_khz="
msg_tsc_how: .asciz " (TSC against PIT channel 2 latched counts: median of 5 x 20 ms)\n"
msg_no_pm:  .asciz "exitbench: op=pm_timer_read skipped (no PM timer in the FADT)\n"
msg_op:     .asciz "exitbench: op="
msg_n:      .asciz " n="
msg_ns:     .asciz " ns="
msg_ticks:  .asciz " ticks="
msg_base:   .asciz " base_ticks="
msg_done:   .asciz "exitbench: done\n"
name_cpuid:         .asciz "cpuid"
name_out_unclaimed: .asciz "out_unclaimed"
name_out_post:      .asciz "out_post"
name_out_doorbell:  .asciz "out_doorbell"
name_pm_read:       .asciz "pm_timer_read"
name_mmio_write:    .asciz "mmio_write"
name_rep_outsb:     .asciz "rep_outsb_4k"

        .section .bss
        .p2align 12
buf:    .skip   4096                    /* page-aligned: one string-I/O chunk */
stack:  .skip   4096
stack_top:
        .p2align 3
t0:     .skip   8
t1:     .skip   8
tsc_khz: .skip  4
pm_port: .skip  4
best:   .skip   4
best_base: .skip 4
base:   .skip   4
reps:   .skip   4
cal_vals: .skip 4 * CAL_RUNS

        .include "pvh_note.inc"
