/*
 * skiff's TPR-patching test kernel (tests/tpr.rs). 32-bit protected mode, paging
 * off, the PVH entry, on one vCPU or more. Lines on COM1, "tpr: ..." each, all
 * printed by the bootstrap processor (BSP):
 *
 * Everything at CPL 0 (this host's KVM cannot emulate a 32-bit iret to user mode,
 * where reports would be exact; at CPL 0 they arrive late and merged).
 * 0. With more than one vCPU (fw_cfg's CPU count), the BSP starts the others (at
 *    most MAX_APS) with INIT and SIPI, as guest/tiny/mb-smp.S does; each wakes in
 *    real mode at TRAMPOLINE, enters protected mode on the BSP's GDT and runs part 1
 *    too, on the same sites (the helper must find each vCPU's own vAPIC slot from
 *    shared code). "tpr: aps N of M done".
 * 1. The six MMIO forms (mov [TPR],r32; mov r32,[TPR]; mov eax,[TPR]; mov [TPR],eax;
 *    mov [TPR],imm32; push [TPR]), one site each, each in a tight loop of LOOPS (a
 *    late report lands on the site, or just past a write, often enough). Each vCPU
 *    writes its own values (BASE + 0x40 * n, BASE + 0x40 * n + 0x10; the imm32 form
 *    writes the same 0x30 everywhere), and every value read back is compared with
 *    the last one this vCPU wrote: "tpr: cpu N value mismatches M" per vCPU. Then
 *    for each site whether it was patched ("tpr: site NAME patched" / "not patched").
 *    A seventh write runs with ESP = 0 and must never be patched. Each AP then
 *    writes its last TPR, 0x80 + 0x40 * (n - 1) ("tpr: cpu N last 0xVV"), and halts.
 * 2. A late report: one TPR write followed by 3,000 other instructions; its site must
 *    not be patched (the report names another instruction). Then the interrupt
 *    case, through tpr_set's site once it is patched (waited for, bounded; "tpr: irq
 *    path patched" or "mmio"): TPR 0x60, a self-IPI at vector 0x50 must stay pending
 *    (not before), TPR 0x50 still masks it, TPR 0x40 unmasks it: "tpr: irq at
 *    lowering yes" when it arrived before the next instruction (the helper's poll
 *    when patched), else how many wait loops later ("tpr: irq arrived after N
 *    loops"); then it is counted once (never lost, never twice).
 * 3. The BSP's last TPR written is 0x20 (skiff's --stats shows KVM_GET_LAPIC's TPR
 *    of every vCPU), then "tpr: done failures=N" and power off by hypercall.
 */
        .set    TPR, 0xfee00080
        .set    SVR, 0xfee000f0
        .set    EOI, 0xfee000b0
        .set    ICR, 0xfee00300
        .set    ICR_HIGH, 0xfee00310
        .set    HC_PAGE, 0xdf000
        .set    HC_POWEROFF, 0x5303
        .set    LOOPS, 10000
        .set    VEC, 0x50
        .set    BASE, 0x20              /* the BSP's first value; vCPU n adds 0x40 * n */
        .set    TRAMPOLINE, 0x8000
        .set    MAX_APS, 2              /* values stay below 0x100 */
        .set    WAIT_LOOPS, 3000000

        .include "fwcfg_cpus.inc"
        .include "pvh_entry.inc"
        mov     %ebx, start_info
        /* IDT: VEC, the self-IPI. */
        mov     $ipi_handler, %eax
        mov     $(VEC * 8), %ebx
        mov     $0x8e00, %ecx
        call    set_gate
        lidt    idt_desc
        /* Software-enable the APIC (KVM syncs the vAPIC only then). */
        movl    $0x1ff, SVR
        mov     $s_start, %esi
        call    puts
        call    start_aps

        /* 1. The six forms, on every vCPU (the APs from ap_main). */
        mov     $BASE, %ebp
        call    forms
        mov     %edi, mismatches
        call    wait_aps
        call    report_cpus
        call    hold_if_asked

        /* ESP 0: a TPR write that must never be patched (the patch would push). */
        mov     $LOOPS, %esi
        mov     $0x30, %ecx
1:      mov     %esp, %ebp
        xor     %esp, %esp
site_esp0:
        mov     %ecx, TPR
        mov     %ebp, %esp
        dec     %esi
        jnz     1b
        call    report_sites

        /* 2a. A late report: one write, then 3,000 other instructions. */
        mov     $0x10, %ecx
site_late:
        mov     %ecx, TPR
        .rept   3000
        inc     %ebx
        .endr
        mov     $site_late, %ebx
        mov     $0x89, %dl
        mov     $n_late, %esi
        call    report_site

        /* 2b. Interrupts: masked while the TPR's class is at or above VEC's. The
           writes go through tpr_set's site: wait (bounded) until it is patched, so
           a run with patching on tests the helper's path; "tpr: irq path" says
           which it is. */
        mov     $(LOOPS * 5), %esi
1:      cmpb    $0xa3, site_store_eax
        jne     2f
        mov     $0x70, %eax
        call    tpr_set
        dec     %esi
        jnz     1b
2:      mov     $s_irq_path, %esi
        call    puts
        mov     $s_path_patched, %esi
        cmpb    $0xa3, site_store_eax
        jne     1f
        mov     $s_path_mmio, %esi
1:      call    puts
        mov     $0x60, %eax
        call    tpr_set
        movl    $0, got
        sti
        movl    $(0x40000 | VEC), ICR   /* self-IPI, fixed, vector VEC */
        mov     $2000, %ecx
1:      pause
        loop    1b
        mov     got, %eax
        mov     $n_irq_masked, %esi
        xor     %edx, %edx
        call    check
        mov     $0x50, %eax             /* the same class as VEC: still masked */
        call    tpr_set
        mov     $2000, %ecx
1:      pause
        loop    1b
        mov     got, %eax
        mov     $n_irq_same_class, %esi
        xor     %edx, %edx
        call    check
        mov     $0x40, %eax             /* below: deliverable now */
        call    tpr_set
        mov     got, %ebx               /* delivered before the next instruction? */
        mov     $s_at_lowering, %esi
        call    puts
        mov     $s_yes, %esi
        test    %ebx, %ebx
        jnz     1f
        mov     $s_no, %esi
1:      call    puts
        /* Otherwise soon (bounded): "tpr: irq arrived after N loops". */
        xor     %ebx, %ebx
1:      cmpl    $0, got
        jne     2f
        pause
        inc     %ebx
        cmp     $20000, %ebx
        jb      1b
2:      mov     $s_after, %esi
        call    puts
        mov     %ebx, %eax
        call    putdec
        mov     $s_loops, %esi
        call    puts
        mov     got, %eax
        mov     $n_irq_after_lowering, %esi
        mov     $1, %edx
        call    check
        mov     $20000, %ecx
1:      pause
        loop    1b
        mov     got, %eax               /* once, never lost, never twice */
        mov     $n_irq_once, %esi
        mov     $1, %edx
        call    check
        cli
        /* The TPR reads back through whatever the site is now. */
        call    tpr_get
        mov     $n_read_back, %esi
        mov     $0x40, %edx
        call    check

        /* 3. The last value written, for skiff's KVM_GET_LAPIC line. */
        mov     $BASE, %eax
        call    tpr_set
        mov     $s_done, %esi
        call    puts
        mov     failures, %eax
        call    putdec
        mov     $10, %al
        call    putc
        mov     $HC_POWEROFF, %eax
        call    HC_PAGE
1:      hlt
        jmp     1b

/* Part 1 on one vCPU: the six forms, LOOPS times each, with this vCPU's values
   (EBP = its base, a multiple of 0x20). EDI = how many reads did not give back
   what this vCPU wrote last. Clobbers EAX, EBX, ECX, EDX, ESI. */
forms:
        xor     %edi, %edi
        mov     $LOOPS, %esi
1:      mov     %esi, %ecx
        and     $0x10, %ecx
        or      %ebp, %ecx
site_store_reg:
        mov     %ecx, TPR               /* 89 0d */
        dec     %esi
        jnz     1b
        mov     $LOOPS, %esi            /* ECX: the value written last */
2:
site_load_reg:
        mov     TPR, %edx               /* 8b 15 */
        cmp     %ecx, %edx
        je      3f
        inc     %edi
3:      dec     %esi
        jnz     2b
        mov     $LOOPS, %esi
4:      mov     %esi, %eax
        and     $0x10, %eax
        or      %ebp, %eax
        call    tpr_set                 /* a3, in a subroutine part 2 calls too */
        dec     %esi
        jnz     4b
        mov     %ebp, %ebx
        or      $0x10, %ebx
        mov     %ebx, %eax
        call    tpr_set
        mov     $LOOPS, %esi
5:
site_load_eax:
        mov     TPR, %eax               /* a1 */
        cmp     %ebx, %eax
        je      6f
        inc     %edi
6:      dec     %esi
        jnz     5b
        mov     $LOOPS, %esi
7:
site_store_imm:
        movl    $0x30, TPR              /* c7 05 */
        dec     %esi
        jnz     7b
        mov     $LOOPS, %esi
8:
site_push:
        pushl   TPR                     /* ff 35 */
        pop     %ebx
        cmp     $0x30, %ebx
        je      9f
        inc     %edi
9:      dec     %esi
        jnz     8b
        ret

/* The TPR from EAX, and into EAX: sites parts 1 and 2 share. */
tpr_set:
site_store_eax:
        mov     %eax, TPR               /* a3 */
        ret
tpr_get:
        mov     TPR, %eax               /* a1 */
        ret

/* With more than one vCPU: start the APs (INIT, SIPI, SIPI to all but self). */
start_aps:
        fwcfg_cpus
        dec     %ebx                    /* APs */
        jle     9f
        cmp     $MAX_APS, %ebx
        jbe     1f
        mov     $MAX_APS, %ebx
1:      mov     %ebx, aps_expected
        mov     $ap_trampoline, %esi
        mov     $TRAMPOLINE, %edi
        mov     $(ap_trampoline_end - ap_trampoline), %ecx
        rep movsb
        movl    $0, ICR_HIGH
        movl    $0x000c4500, ICR        /* INIT, all excluding self */
        call    icr_wait
        movl    $(0x000c4600 | (TRAMPOLINE >> 12)), ICR
        call    icr_wait
        movl    $(0x000c4600 | (TRAMPOLINE >> 12)), ICR
        call    icr_wait
9:      ret

/* Waits (bounded) for the ICR's delivery status to clear. */
icr_wait:
        push    %ecx
        mov     $100000, %ecx
1:      testl   $0x1000, ICR
        jz      2f
        pause
        loop    1b
2:      pop     %ecx
        ret

/* Waits (bounded) until every AP started has finished part 1. */
wait_aps:
        mov     $WAIT_LOOPS, %ecx
1:      mov     aps_done, %eax
        cmp     aps_expected, %eax
        jae     2f
        pause
        loop    1b
2:      ret

/* "tpr: aps N of M done", then per vCPU its mismatches and (APs) its last value. */
report_cpus:
        mov     $s_aps, %esi
        call    puts
        mov     aps_done, %eax
        call    putdec
        mov     $s_of, %esi
        call    puts
        mov     aps_expected, %eax
        call    putdec
        mov     $s_done_nl, %esi
        call    puts
        xor     %ebx, %ebx
1:      mov     $s_cpu, %esi
        call    puts
        mov     %ebx, %eax
        call    putdec
        mov     $s_mismatches, %esi
        call    puts
        mov     mismatches(,%ebx,4), %eax
        call    putdec
        test    %ebx, %ebx
        jz      2f
        mov     $s_last, %esi
        call    puts
        mov     ap_last - 4(,%ebx,4), %eax
        call    puthex
2:      mov     $10, %al
        call    putc
        inc     %ebx
        cmp     aps_done, %ebx
        jbe     1b
        ret

/* With the command line "hold" (tests/tpr.rs snapshots the machine here): "tpr:
   holding", then read the TPR through tpr_get's site until a byte arrives on COM1,
   each read checked against the BSP's last write (0x30, part 1's imm32 form): "tpr:
   reads while holding ok". */
hold_if_asked:
        mov     start_info, %ebx
        mov     0x18(%ebx), %ebx        /* hvm_start_info.cmdline_paddr (low half) */
        test    %ebx, %ebx
        jz      9f
        cmpl    $0x646c6f68, (%ebx)     /* "hold" */
        jne     9f
        mov     $s_holding, %esi
        call    puts
1:      call    tpr_get
        cmp     $0x30, %eax
        je      2f
        incl    hold_mismatches
2:      mov     $0x3fd, %dx             /* line status: data ready? */
        in      %dx, %al
        test    $1, %al
        jz      1b
        mov     $0x3f8, %dx
        in      %dx, %al
        mov     hold_mismatches, %eax
        mov     $n_hold, %esi
        xor     %edx, %edx
        call    check
9:      ret

/* Which sites were rewritten. */
report_sites:
        mov     $site_store_reg, %ebx
        mov     $0x89, %dl
        mov     $n_store_reg, %esi
        call    report_site
        mov     $site_load_reg, %ebx
        mov     $0x8b, %dl
        mov     $n_load_reg, %esi
        call    report_site
        mov     $site_store_eax, %ebx
        mov     $0xa3, %dl
        mov     $n_store_eax, %esi
        call    report_site
        mov     $site_load_eax, %ebx
        mov     $0xa1, %dl
        mov     $n_load_eax, %esi
        call    report_site
        mov     $site_store_imm, %ebx
        mov     $0xc7, %dl
        mov     $n_store_imm, %esi
        call    report_site
        mov     $site_push, %ebx
        mov     $0xff, %dl
        mov     $n_push, %esi
        call    report_site
        mov     $site_esp0, %ebx
        mov     $0x89, %dl
        mov     $n_esp0, %esi
        call    report_site
        ret

/* The self-IPI. Returns without iret (which this host's KVM cannot emulate in
   protected mode): the frame's EIP, then its EFLAGS (IF back on). */
ipi_handler:
        incl    got
        movl    $0, EOI
        popl    ipi_return
        add     $4, %esp
        popfl
        jmp     *ipi_return

/* EAX == EDX? "tpr: NAME ok" or "tpr: NAME FAIL got=EAX"; counts failures. */
check:
        push    %esi
        push    %esi
        mov     $s_prefix, %esi
        call    puts
        pop     %esi
        call    puts
        cmp     %edx, %eax
        jne     1f
        mov     $s_ok, %esi
        call    puts
        pop     %esi
        ret
1:      incl    failures
        mov     $s_fail, %esi
        call    puts
        call    puthex
        mov     $10, %al
        call    putc
        pop     %esi
        ret

/* The site at EBX still starts with DL? "tpr: site NAME not patched", else "patched". */
report_site:
        push    %esi
        mov     $s_site, %esi
        call    puts
        pop     %esi
        call    puts
        mov     $s_patched, %esi
        cmp     (%ebx), %dl
        jne     1f
        mov     $s_not_patched, %esi
1:      call    puts
        ret

/* IDT gate: handler EAX, byte offset EBX, type/DPL word ECX. */
set_gate:
        mov     %ax, idt(%ebx)
        movw    $0x08, idt + 2(%ebx)
        mov     %cx, idt + 4(%ebx)
        shr     $16, %eax
        mov     %ax, idt + 6(%ebx)
        ret

/* An AP in protected mode: its number n (1, 2, ...) in the order they arrive, its
   own stack, the shared IDT, its APIC enabled; part 1 with its values; then its
   last TPR, and it is done. */
ap_main:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $1, %ebx
        lock xadd %ebx, aps_started     /* EBX = n - 1 */
        cmp     $MAX_APS, %ebx
        jae     9f
        mov     %ebx, %esp
        inc     %esp
        shl     $12, %esp
        add     $ap_stacks, %esp
        lidt    idt_desc
        movl    $0x1ff, SVR
        push    %ebx
        lea     1(%ebx), %ebp
        shl     $6, %ebp
        add     $BASE, %ebp             /* BASE + 0x40 * n */
        call    forms
        pop     %ebx
        mov     %edi, mismatches + 4(,%ebx,4)
        mov     %ebx, %eax
        shl     $6, %eax
        add     $0x80, %eax             /* 0x80 + 0x40 * (n - 1) */
        mov     %eax, ap_last(,%ebx,4)
        call    tpr_set
        lock incl aps_done
9:      cli
1:      hlt
        jmp     1b

        .include "console.inc"

/* The APs' real-mode start, copied to TRAMPOLINE (CS = TRAMPOLINE >> 4, IP = 0):
   the BSP's GDT, protected mode, and a far jump into ap_main. */
        .code16
ap_trampoline:
        cli
        cld
        lgdtl   %cs:(ap_gdt_desc - ap_trampoline)
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $ap_main
        .p2align 2
ap_gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
ap_trampoline_end:
        .code32

        .include "flat_gdt.inc"
idt_desc:
        .word   0x81 * 8 - 1
        .long   idt
got:    .long   0
ipi_return: .long 0
failures: .long 0
start_info: .long 0
hold_mismatches: .long 0
aps_expected: .long 0
aps_started: .long 0
aps_done: .long 0
mismatches: .fill MAX_APS + 1, 4, 0     /* per vCPU, BSP first */
ap_last: .fill MAX_APS, 4, 0            /* per AP: its last TPR */
s_start:        .asciz "tpr: start\n"
s_aps:          .asciz "tpr: aps "
s_of:           .asciz " of "
s_done_nl:      .asciz " done\n"
s_cpu:          .asciz "tpr: cpu "
s_mismatches:   .asciz " value mismatches "
s_last:         .asciz " last 0x"
s_done:         .asciz "tpr: done failures="
s_prefix:       .asciz "tpr: "
s_ok:           .asciz " ok\n"
s_fail:         .asciz " FAIL got="
s_site:         .asciz "tpr: site "
s_patched:      .asciz " patched\n"
s_not_patched:  .asciz " not patched\n"
n_store_reg:    .asciz "mov [tpr],r32"
n_load_reg:     .asciz "mov r32,[tpr]"
n_store_eax:    .asciz "mov [tpr],eax"
n_load_eax:     .asciz "mov eax,[tpr]"
n_store_imm:    .asciz "mov [tpr],imm32"
n_push:         .asciz "push [tpr]"
n_esp0:         .asciz "esp0"
n_late:         .asciz "late"
n_irq_masked:   .asciz "irq masked by tpr 0x60"
n_irq_same_class: .asciz "irq masked by tpr 0x50"
n_irq_after_lowering: .asciz "irq delivered after lowering"
s_irq_path:     .asciz "tpr: irq path "
s_path_patched: .asciz "patched\n"
s_path_mmio:    .asciz "mmio\n"
s_at_lowering:  .asciz "tpr: irq at lowering "
s_yes:          .asciz "yes\n"
s_no:           .asciz "no\n"
s_after:        .asciz "tpr: irq arrived after "
s_loops:        .asciz " loops\n"
n_irq_once:     .asciz "irq delivered once"
n_read_back:    .asciz "read back 0x40"
s_holding:      .asciz "tpr: holding\n"
n_hold:         .asciz "reads while holding"

        .section .bss
        .p2align 12
idt:    .skip   0x81 * 8
        .p2align 12
        .skip   4096
stack_top:
ap_stacks:                              /* AP n's stack ends at ap_stacks + 4096 * n */
        .skip   4096 * MAX_APS

        .include "pvh_note.inc"
