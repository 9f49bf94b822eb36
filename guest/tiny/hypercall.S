/*
 * skiff's hypercall test kernel (tests/hypercall.rs) and benchmark (bench/hypercall.py,
 * built with BENCH=1 as hcbench.elf). 64-bit long mode at CPL 0, identity-mapped
 * first GiB (2 MiB pages, user-accessible for the CPL 3 part of the benchmark).
 *
 * Test: finds skiff's CPUID leaves, then makes every call through every path and
 * checks each result, one line each on COM1:  "hc: NAME ok" or "hc: NAME FAIL rax=..".
 * Paths: direct (call the hypercall page's stub), trap (a raw site: int3 +
 * nopl 0x55(%rax), never patched), patched (a raw site with 0x53: skiff rewrites it
 * after its first trap; checked to become `call` of the patched stub, or the stub's
 * `out` inline when the page's address was not given), ring (queued, doorbell or
 * flush call), and a hostile ring. Boot 1 ends by the reboot hypercall; boot 2
 * (CMOS byte 0x39 counts boots) checks the page and leaves again, then powers off by
 * hypercall. Last line: "hc: done failures=N".
 */
        .set    PAGE, 0xdf000
        .set    PATCHED_STUB, PAGE + 0x10
        .set    HC_NOP, 0x5300
        .set    HC_CONSOLE, 0x5301
        .set    HC_READY, 0x5302
        .set    HC_POWEROFF, 0x5303
        .set    HC_REBOOT, 0x5304
        .set    HC_TIME, 0x5305
        .set    HC_RING_SET, 0x5306
        .set    HC_RING_FLUSH, 0x5307
        .set    HC_PAGE_VA, 0x5308
        .set    RING, 0x300000
        .set    R_HEAD, RING
        .set    R_TAIL, RING + 4
        .set    R_STATUS, RING + 64
        .set    R_ENTRY, RING + 128
        .set    BOOTS, 0x39             /* CMOS RAM byte: boots so far */
        .set    USER_DS, 0x28 | 3
        .set    USER_CS, 0x30 | 3
.ifndef BENCH
        .set    BENCH, 0
.endif

/* Direct: RAX = nr, then the page's stub. */
.macro HC nr
        mov     $\nr, %eax
        call    PAGE
.endm
/* A raw site: int3; nopl MARK(%rax). */
.macro RAW nr, mark
        mov     $\nr, %eax
        .byte   0xcc, 0x0f, 0x1f, 0x40, \mark
.endm
/* RAX == value (sign-extended 32-bit immediate)? Prints the line for NAME. */
.macro CHECK name, value
        lea     \name(%rip), %rsi
        mov     $\value, %rdi
        call    check
.endm

        .include "pvh_entry.inc"
        /* PML4[0] -> PDPT[0] -> PD: 512 x 2 MiB, present, writable, user. */
        movl    $(pdpt + 7), pml4
        movl    $(pd + 7), pdpt
        xor     %ecx, %ecx
2:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x87, %eax
        mov     %eax, pd(,%ecx,8)
        inc     %ecx
        cmp     $512, %ecx
        jb      2b
        mov     %cr4, %eax
        or      $0x620, %eax            /* PAE, OSFXSR, OSXMMEXCPT */
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx
        rdmsr
        or      $0x100, %eax            /* EFER.LME */
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax
        mov     %eax, %cr0
        ljmp    $0x18, $long_mode

        .code64
long_mode:
        mov     $0x20, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        lea     stack_top(%rip), %rsp
        /* skiff's leaves */
        mov     $0x40000100, %eax
        cpuid
        cmp     $0x66696b53, %ebx       /* "Skif" */
        jne     no_skiff
        cmp     $0x696b5366, %ecx       /* "fSki" */
        jne     no_skiff
        cmp     $0x6b536666, %edx       /* "ffSk" */
        jne     no_skiff
        mov     $0x40000101, %eax
        cpuid
        cmp     $PAGE, %eax
        jne     no_skiff
        mov     %ecx, caps(%rip)
        lea     s_found(%rip), %rsi
        call    puts
.if BENCH
        jmp     bench
.endif
        /* Second boot? */
        mov     $BOOTS, %al
        out     %al, $0x70
        in      $0x71, %al
        test    %al, %al
        jnz     second_boot
        mov     $BOOTS, %al
        out     %al, $0x70
        mov     $1, %al
        out     %al, $0x71

        /* (b) direct */
        HC      HC_NOP
        CHECK   n_d_nop, 0
        HC      0x1234
        CHECK   n_d_unknown, -1000
        HC      1                       /* KVM's own numbers are not skiff's */
        CHECK   n_d_kvmnr, -1000
        mov     $HC_CONSOLE, %eax
        lea     msg_direct(%rip), %rbx
        mov     $msg_direct_len, %ecx
        call    PAGE
        CHECK   n_d_console, msg_direct_len
        mov     $HC_CONSOLE, %eax
        mov     $0x7fff0000000, %rbx    /* outside RAM */
        mov     $4, %ecx
        call    PAGE
        CHECK   n_d_console_efault, -14
        mov     $HC_CONSOLE, %eax
        lea     msg_direct(%rip), %rbx
        mov     $5000, %ecx             /* over the limit */
        call    PAGE
        CHECK   n_d_console_e2big, -7
        HC      HC_TIME
        call    check_time
        HC      HC_READY
        CHECK   n_d_ready, 0
        /* registers other than RAX survive */
        mov     $0x1111, %ebx
        mov     $0x2222, %ecx
        mov     $0x3333, %edx
        mov     $0x4444, %esi
        mov     $0x5555, %edi
        HC      HC_NOP
        xor     %eax, %eax
        cmp     $0x1111, %rbx
        setne   %al
        cmp     $0x2222, %rcx
        setne   %ah
        or      %ah, %al
        cmp     $0x3333, %rdx
        setne   %ah
        or      %ah, %al
        cmp     $0x4444, %rsi
        setne   %ah
        or      %ah, %al
        cmp     $0x5555, %rdi
        setne   %ah
        or      %ah, %al
        movzx   %al, %eax
        CHECK   n_d_regs, 0

        /* (a) trap and emulate, when skiff says raw sites trap here */
        testl   $1, caps(%rip)
        jz      no_trap
        RAW     HC_NOP, 0x55
        CHECK   n_t_nop, 0
        RAW     0x1234, 0x55
        CHECK   n_t_unknown, -1000
        mov     $HC_CONSOLE, %eax
        lea     msg_trap(%rip), %rbx
        mov     $msg_trap_len, %ecx
        .byte   0xcc, 0x0f, 0x1f, 0x40, 0x55
        CHECK   n_t_console, msg_trap_len
        mov     $HC_TIME, %eax
site_kept:
        .byte   0xcc, 0x0f, 0x1f, 0x40, 0x55
        call    check_time
        /* the unpatched site is still raw after its traps */
        mov     site_kept(%rip), %eax
        CHECK   n_t_kept, 0x401f0fcc

        /* (c) patched: the page's address given, so a call of the patched stub */
        mov     $HC_PAGE_VA, %eax
        mov     $PAGE, %ebx
        call    PAGE
        CHECK   n_p_va, 0
        lea     site_call(%rip), %rdi
        call    patch_wait
        CHECK   n_p_patched, 0
        movzbl  site_call(%rip), %eax
        CHECK   n_p_is_call, 0xe8
        movslq  site_call+1(%rip), %rax
        lea     site_call+5(%rip), %rdx
        add     %rdx, %rax
        CHECK   n_p_target, PATCHED_STUB
        mov     $HC_TIME, %edi
        call    site_call_fn
        call    check_time
        mov     $0x1234, %edi
        call    site_call_fn
        CHECK   n_p_unknown, -1000
        /* without the page's address: the stub's out inline */
        mov     $HC_PAGE_VA, %eax
        xor     %ebx, %ebx
        call    PAGE
        lea     site_inline(%rip), %rdi
        call    patch_wait
        CHECK   n_p_patched2, 0
        mov     site_inline(%rip), %eax
        CHECK   n_p_inline, 0x1f0f9be6  /* e6 9b 0f 1f */
        mov     $HC_NOP, %edi
        call    site_inline_fn
        CHECK   n_p_inline_nop, 0
no_trap:

        /* ring: registration refused when hostile */
        mov     $HC_RING_SET, %eax
        mov     $RING + 8, %ebx
        call    PAGE
        CHECK   n_r_unaligned, -22
        mov     $HC_RING_SET, %eax
        mov     $0x7fff0000000, %rbx
        call    PAGE
        CHECK   n_r_outside, -22
        mov     $HC_RING_SET, %eax
        mov     $PAGE, %ebx
        call    PAGE
        CHECK   n_r_page, -22
        HC      HC_RING_FLUSH
        CHECK   n_r_none, -22
        mov     $HC_RING_SET, %eax
        mov     $RING, %ebx
        call    PAGE
        CHECK   n_r_set, 0
        /* three calls by the doorbell: nop, console, a ring op (refused inside) */
        xor     %r12d, %r12d            /* r12 = head */
        mov     $HC_NOP, %edi
        xor     %esi, %esi
        xor     %edx, %edx
        call    ring_queue
        mov     $HC_CONSOLE, %edi
        lea     msg_ring(%rip), %rsi
        mov     $msg_ring_len, %edx
        call    ring_queue
        mov     $HC_RING_SET, %edi
        xor     %esi, %esi
        call    ring_queue
        mov     $HC_CONSOLE, %edi       /* a pointer outside RAM */
        mov     $0x7fff0000000, %rsi
        mov     $4, %edx
        call    ring_queue
        mov     %r12d, R_HEAD
        out     %al, $0x9c              /* the doorbell */
        mov     $3, %edi
        call    ring_wait
        CHECK   n_r_doorbell, 0
        mov     R_ENTRY + 0*48 + 40, %rax
        CHECK   n_r_nop, 0
        mov     R_ENTRY + 1*48 + 40, %rax
        CHECK   n_r_console, msg_ring_len
        mov     R_ENTRY + 2*48 + 40, %rax
        CHECK   n_r_nested, -22
        mov     R_ENTRY + 3*48 + 40, %rax
        CHECK   n_r_efault, -14
        mov     R_TAIL, %eax
        CHECK   n_r_tail, 4
        /* a full ring (64, wrapping the slots) by the flush call */
        mov     $64, %r13d
1:      mov     $HC_NOP, %edi
        call    ring_queue
        dec     %r13d
        jnz     1b
        mov     %r12d, R_HEAD
        HC      HC_RING_FLUSH
        CHECK   n_r_full, 64
        /* hostile: a count past the end, a head behind the tail */
        lea     65(%r12), %eax
        mov     %eax, R_HEAD
        HC      HC_RING_FLUSH
        CHECK   n_r_past_end, -7
        lea     -1(%r12), %eax
        mov     %eax, R_HEAD
        HC      HC_RING_FLUSH
        CHECK   n_r_behind, -7
        /* announced but not queued */
        mov     %r12d, %eax
        and     $63, %eax
        movb    $0, R_STATUS(%rax)
        lea     1(%r12), %eax
        mov     %eax, R_HEAD
        HC      HC_RING_FLUSH
        CHECK   n_r_unqueued, -22
        mov     %r12d, R_HEAD           /* back to sane: nothing pending */
        HC      HC_RING_FLUSH
        CHECK   n_r_sane, 0

        call    report
        HC      HC_REBOOT
        lea     s_alive(%rip), %rsi     /* not reached: the reboot stops the vCPU */
        call    puts
1:      hlt
        jmp     1b

second_boot:
        lea     s_second(%rip), %rsi
        call    puts
        /* the page was written again after the reset (RAM was cleared) */
        mov     PAGE, %eax
        and     $0xffffff, %eax
        CHECK   n_b2_page, 0xc39ae6
        HC      HC_NOP
        CHECK   n_b2_nop, 0
        mov     $HC_CONSOLE, %eax
        lea     msg_b2(%rip), %rbx
        mov     $msg_b2_len, %ecx
        call    PAGE
        CHECK   n_b2_console, msg_b2_len
        HC      HC_RING_FLUSH
        CHECK   n_b2_no_ring, -22       /* the ring went with the reset */
        call    report
        HC      HC_POWEROFF
        lea     s_alive(%rip), %rsi     /* not reached: poweroff stops the vCPU */
        call    puts
1:      hlt
        jmp     1b

no_skiff:
        lea     s_noskiff(%rip), %rsi
        call    puts
        mov     $0x604, %dx
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
1:      hlt
        jmp     1b

/* The patchable sites, each in a function: EDI = nr. */
site_call_fn:
        mov     %edi, %eax
site_call:
        .byte   0xcc, 0x0f, 0x1f, 0x40, 0x53
        ret
site_inline_fn:
        mov     %edi, %eax
site_inline:
        .byte   0xcc, 0x0f, 0x1f, 0x40, 0x53
        ret

/* Calls the site function at RDI - 2 (site_X_fn) with HC_NOP until the site is no
 * longer raw (skiff patches it from its event loop, a moment after the first trap);
 * RAX = 0 when it was patched, 1 when not within the bound. */
patch_wait:
        push    %rbx
        mov     %rdi, %rbx
        mov     $100000, %ecx
1:      cmpb    $0xcc, (%rbx)
        jne     2f
        push    %rcx
        mov     $HC_NOP, %edi
        lea     -2(%rbx), %rdx
        call    *%rdx
        pop     %rcx
        dec     %ecx
        jnz     1b
        mov     $1, %eax
        pop     %rbx
        ret
2:      xor     %eax, %eax
        pop     %rbx
        ret

/* Queues EDI = nr, RSI/RDX = first two args at head R12 (then R12 + 1). */
ring_queue:
        mov     %r12d, %eax
        and     $63, %eax
        imul    $48, %eax, %ecx
        mov     %rdi, R_ENTRY(%rcx)
        mov     %rsi, R_ENTRY + 8(%rcx)
        mov     %rdx, R_ENTRY + 16(%rcx)
        movq    $-1, R_ENTRY + 40(%rcx)
        movb    $1, R_STATUS(%rax)
        inc     %r12d
        ret

/* Waits (bounded) until slot EDI - 1 is done; RAX = 0 if it was. */
ring_wait:
        dec     %edi
        and     $63, %edi
        mov     $1000000, %ecx
1:      cmpb    $2, R_STATUS(%rdi)
        je      2f
        pause
        dec     %ecx
        jnz     1b
        mov     $1, %eax
        ret
2:      xor     %eax, %eax
        ret

/* RAX: CLOCK_REALTIME ns; after 2020 and before 2100 is "ok". */
check_time:
        lea     n_time(%rip), %rsi
        mov     $1577836800000000000, %rdx
        cmp     %rdx, %rax
        jb      1f
        mov     $4102444800000000000, %rdx
        cmp     %rdx, %rax
        ja      1f
        xor     %eax, %eax
1:      xor     %edi, %edi
        jmp     check

/* RAX = the result, RDI = the expected value, RSI = the case's name. */
check:
        push    %rax
        push    %rsi
        lea     s_hc(%rip), %rsi
        call    puts
        pop     %rsi
        call    puts
        pop     %rax
        cmp     %rdi, %rax
        jne     1f
        lea     s_ok(%rip), %rsi
        jmp     puts
1:      incl    failures(%rip)
        push    %rax
        lea     s_fail(%rip), %rsi
        call    puts
        pop     %rax
        call    puthex
        mov     $'\n', %al
        jmp     putc

report:
        lea     s_done(%rip), %rsi
        call    puts
        mov     failures(%rip), %eax
        call    puthex
        mov     $'\n', %al
        jmp     putc

/* COM1 output; every register but RAX (and RSI for puts) preserved. */
putc:
        push    %rdx
        mov     $0x3f8, %dx
        out     %al, %dx
        pop     %rdx
        ret
puts:
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc
        jmp     1b
2:      ret
/* RAX as 16 hex digits */
puthex:
        push    %rcx
        push    %rdx
        mov     %rax, %rdx
        mov     $16, %ecx
1:      rol     $4, %rdx
        mov     %dl, %al
        and     $0xf, %al
        add     $'0', %al
        cmp     $'9', %al
        jbe     2f
        add     $('a' - '9' - 1), %al
2:      call    putc
        loop    1b
        pop     %rdx
        pop     %rcx
        ret

.if BENCH
/* The benchmark: each op is a function making one call; its loop's TSC ticks less
 * the same loop calling op_base (the mov and ret every op has) are the call's cost.
 * Both loops run REPS times interleaved; the lowest of each counts. One line per op:
 *   hcbench: op=NAME iters=HEX calls=HEX ticks=HEX base=HEX
 * and first the TSC against skiff's clock: hcbench: cal ticks=HEX ns=HEX. */
        .set    REPS, 5
bench:
        /* calibration: host time around a ~30 ms spin */
        HC      HC_TIME
        mov     %rax, %r12
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        mov     %rdx, %r13
        mov     $20000, %ecx
1:      dec     %ecx
        jnz     1b
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        mov     %rdx, %r14
        HC      HC_TIME
        sub     %r12, %rax
        mov     %rax, %r12
        sub     %r13, %r14
        lea     s_cal(%rip), %rsi
        call    puts
        mov     %r14, %rax
        call    puthex
        lea     s_ns(%rip), %rsi
        call    puts
        mov     %r12, %rax
        call    puthex
        mov     $'\n', %al
        call    putc
        /* ring registered; page address given (patched sites become calls) */
        mov     $HC_RING_SET, %eax
        mov     $RING, %ebx
        call    PAGE
        mov     $HC_PAGE_VA, %eax
        mov     $PAGE, %ebx
        call    PAGE
        xor     %r12d, %r12d            /* ring head */
        lea     bench_site(%rip), %rdi
        call    patch_wait_bench

        lea     op_direct(%rip), %rbx
        lea     n_b_direct(%rip), %rbp
        mov     $200, %r15d
        mov     $1, %r8d
        call    time_op
        testl   $1, caps(%rip)
        jz      1f
        lea     op_trap(%rip), %rbx
        lea     n_b_trap(%rip), %rbp
        call    time_op
        lea     op_patched(%rip), %rbx
        lea     n_b_patched(%rip), %rbp
        call    time_op
1:      lea     op_ring1(%rip), %rbx
        lea     n_b_ring1(%rip), %rbp
        call    time_op
        lea     op_ring8(%rip), %rbx
        lea     n_b_ring8(%rip), %rbp
        mov     $50, %r15d
        mov     $8, %r8d
        call    time_op
        lea     op_ring64(%rip), %rbx
        lea     n_b_ring64(%rip), %rbp
        mov     $10, %r15d
        mov     $64, %r8d
        call    time_op
        /* The same ring batches filled at CPL 3, where this host runs guest code
         * natively: iretq to a 64-bit user segment with IOPL 3, so the doorbell
         * `out` (an ioeventfd: no exit) and the console work from there, and the
         * rest of the benchmark, its poweroff call included (the page's stub is an
         * `out` too), stays at CPL 3: no way back to CPL 0 is needed. */
        lea     ustack_top(%rip), %rax
        pushq   $USER_DS
        push    %rax
        pushq   $0x3002                 /* IOPL 3, interrupts off */
        pushq   $USER_CS
        lea     user_bench(%rip), %rax
        push    %rax
        iretq
user_bench:
        mov     %cs, %eax
        and     $3, %eax
        lea     n_b_cpl3(%rip), %rbp
        cmp     $3, %eax
        je      1f
        lea     s_nocpl3(%rip), %rsi
        call    puts
        jmp     2f
1:      lea     op_direct(%rip), %rbx
        lea     n_b_u_direct(%rip), %rbp
        mov     $200, %r15d
        mov     $1, %r8d
        call    time_op
        lea     op_ring1(%rip), %rbx
        lea     n_b_u_ring1(%rip), %rbp
        call    time_op
        lea     op_ring8(%rip), %rbx
        lea     n_b_u_ring8(%rip), %rbp
        mov     $50, %r15d
        mov     $8, %r8d
        call    time_op
        lea     op_ring64(%rip), %rbx
        lea     n_b_u_ring64(%rip), %rbp
        mov     $10, %r15d
        mov     $64, %r8d
        call    time_op
2:      lea     s_bdone(%rip), %rsi
        call    puts
        HC      HC_POWEROFF
1:      jmp     1b                      /* hlt would #GP at CPL 3 */

/* RBX = op, RBP = name, R15 = iterations, R8 = calls per op. */
time_op:
        push    %r8
        movq    $-1, best(%rip)
        movq    $-1, best_base(%rip)
        movl    $REPS, reps(%rip)
1:      lea     op_base(%rip), %rdi
        call    time_loop
        cmp     best_base(%rip), %rax
        jae     2f
        mov     %rax, best_base(%rip)
2:      mov     %rbx, %rdi
        call    time_loop
        cmp     best(%rip), %rax
        jae     3f
        mov     %rax, best(%rip)
3:      decl    reps(%rip)
        jnz     1b
        lea     s_op(%rip), %rsi
        call    puts
        mov     %rbp, %rsi
        call    puts
        lea     s_iters(%rip), %rsi
        call    puts
        mov     %r15, %rax
        call    puthex
        lea     s_calls(%rip), %rsi
        call    puts
        pop     %rax
        call    puthex
        lea     s_ticks(%rip), %rsi
        call    puts
        mov     best(%rip), %rax
        call    puthex
        lea     s_base(%rip), %rsi
        call    puts
        mov     best_base(%rip), %rax
        call    puthex
        mov     $'\n', %al
        jmp     putc

/* RDI = op: TSC ticks for R15 calls of it, in RAX. */
time_loop:
        push    %rbx
        push    %r13
        mov     %rdi, %rbx
        mov     %r15d, %r13d
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        mov     %rdx, t0(%rip)
1:      call    *%rbx
        dec     %r13d
        jnz     1b
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        sub     t0(%rip), %rdx
        mov     %rdx, %rax
        pop     %r13
        pop     %rbx
        ret

op_base:
        mov     $HC_NOP, %eax
        ret
op_direct:
        mov     $HC_NOP, %eax
        call    PAGE
        ret
op_trap:
        mov     $HC_NOP, %eax
        .byte   0xcc, 0x0f, 0x1f, 0x40, 0x55
        ret
op_patched:
        mov     $HC_NOP, %eax
bench_site:
        .byte   0xcc, 0x0f, 0x1f, 0x40, 0x53
        ret
/* Batches: N entries of HC_NOP, the doorbell, and a wait for the last one's status. */
.macro RING_OP n
        mov     $HC_NOP, %eax
        mov     $\n, %ecx
1:      mov     %r12d, %edx
        and     $63, %edx
        imul    $48, %edx, %esi
        mov     %rax, R_ENTRY(%rsi)
        movb    $1, R_STATUS(%rdx)
        inc     %r12d
        dec     %ecx
        jnz     1b
        mov     %r12d, R_HEAD
        out     %al, $0x9c
2:      cmpb    $2, R_STATUS(%rdx)
        jne     2b
        ret
.endm
op_ring1:
        RING_OP 1
op_ring8:
        RING_OP 8
op_ring64:
        RING_OP 64

/* Like patch_wait, for op_patched's site. */
patch_wait_bench:
        testl   $1, caps(%rip)
        jz      2f
        mov     $100000, %ecx
1:      cmpb    $0xcc, bench_site(%rip)
        jne     2f
        push    %rcx
        call    op_patched
        pop     %rcx
        dec     %ecx
        jnz     1b
2:      ret
.endif

        .section .data
        .align  8
gdt:    .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08: code32 */
        .quad   0x00cf92000000ffff      /* 0x10: data */
        .quad   0x00af9a000000ffff      /* 0x18: code64 */
        .quad   0x00cf92000000ffff      /* 0x20: data */
        .quad   0x00cff2000000ffff      /* 0x28: user data (DPL 3) */
        .quad   0x00affa000000ffff      /* 0x30: user code64 (DPL 3) */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
failures: .long 0
caps:   .long   0
reps:   .long   0
        .align  8
best:   .quad   0
best_base: .quad 0
t0:     .quad   0
s_found:   .asciz "hc: skiff's hypercall leaves found\n"
s_noskiff: .asciz "hc: no skiff hypercall leaves\n"
s_second:  .asciz "hc: second boot\n"
s_alive:   .asciz "hc: still running after the call that stops the machine\n"
s_hc:      .asciz "hc: "
s_ok:      .asciz " ok\n"
s_fail:    .asciz " FAIL rax="
s_done:    .asciz "hc: done failures="
s_cal:     .asciz "hcbench: cal ticks="
s_ns:      .asciz " ns="
s_op:      .asciz "hcbench: op="
s_iters:   .asciz " iters="
s_calls:   .asciz " calls="
s_ticks:   .asciz " ticks="
s_base:    .asciz " base="
s_bdone:   .asciz "hcbench: done\n"
msg_direct: .ascii "hc-console: written by the direct call\n"
        .set    msg_direct_len, . - msg_direct
msg_trap:  .ascii "hc-console: written by the trapped call\n"
        .set    msg_trap_len, . - msg_trap
msg_ring:  .ascii "hc-console: written by the ring\n"
        .set    msg_ring_len, . - msg_ring
msg_b2:    .ascii "hc-console: written after the reboot\n"
        .set    msg_b2_len, . - msg_b2
n_d_nop:            .asciz "direct nop"
n_d_unknown:        .asciz "direct unknown number"
n_d_kvmnr:          .asciz "direct KVM number"
n_d_console:        .asciz "direct console"
n_d_console_efault: .asciz "direct console outside RAM"
n_d_console_e2big:  .asciz "direct console too long"
n_d_ready:          .asciz "direct ready"
n_d_regs:           .asciz "direct registers kept"
n_time:             .asciz "time"
n_t_nop:            .asciz "trap nop"
n_t_unknown:        .asciz "trap unknown number"
n_t_console:        .asciz "trap console"
n_t_kept:           .asciz "trap site kept raw"
n_p_va:             .asciz "patch page address"
n_p_patched:        .asciz "patch call site rewritten"
n_p_is_call:        .asciz "patch is a call"
n_p_target:         .asciz "patch calls the patched stub"
n_p_unknown:        .asciz "patched unknown number"
n_p_patched2:       .asciz "patch inline site rewritten"
n_p_inline:         .asciz "patch inline is out 0x9b"
n_p_inline_nop:     .asciz "patched inline nop"
n_r_unaligned:      .asciz "ring unaligned refused"
n_r_outside:        .asciz "ring outside RAM refused"
n_r_page:           .asciz "ring on the hypercall page refused"
n_r_none:           .asciz "ring flush without a ring"
n_r_set:            .asciz "ring registered"
n_r_doorbell:       .asciz "ring doorbell ran the batch"
n_r_nop:            .asciz "ring nop"
n_r_console:        .asciz "ring console"
n_r_nested:         .asciz "ring op inside the ring refused"
n_r_efault:         .asciz "ring console outside RAM"
n_r_tail:           .asciz "ring tail"
n_r_full:           .asciz "ring full flush"
n_r_past_end:       .asciz "ring count past the end refused"
n_r_behind:         .asciz "ring head behind the tail refused"
n_r_unqueued:       .asciz "ring entry not queued refused"
n_r_sane:           .asciz "ring sane again"
n_b2_page:          .asciz "second boot page stub"
n_b2_nop:           .asciz "second boot nop"
n_b2_console:       .asciz "second boot console"
n_b2_no_ring:       .asciz "second boot no ring"
n_b_direct:         .asciz "direct"
n_b_trap:           .asciz "trap"
n_b_patched:        .asciz "patched"
n_b_ring1:          .asciz "ring1"
n_b_ring8:          .asciz "ring8"
n_b_ring64:         .asciz "ring64"
n_b_cpl3:           .asciz "cpl3"
n_b_u_direct:       .asciz "u_direct"
n_b_u_ring1:        .asciz "u_ring1"
n_b_u_ring8:        .asciz "u_ring8"
n_b_u_ring64:       .asciz "u_ring64"
s_nocpl3:  .asciz "hcbench: not at CPL 3 after iretq\n"

        .section .bss
        .align  4096
pml4:   .skip   4096
pdpt:   .skip   4096
pd:     .skip   4096
        .skip   16384
stack_top:
        .skip   16384
ustack_top:

        .include "pvh_note.inc"
