/*
 * skiff's TPR-patching test kernel (tests/tpr.rs). 32-bit protected mode, paging
 * off, the PVH entry. Lines on COM1, "tpr: ..." each:
 *
 * Everything at CPL 0 (this host's KVM cannot emulate a 32-bit iret to user mode,
 * where reports would be exact; at CPL 0 they arrive late and merged).
 * 1. The six MMIO forms (mov [TPR],r32; mov r32,[TPR]; mov eax,[TPR]; mov [TPR],eax;
 *    mov [TPR],imm32; push [TPR]), one site each, each in a tight loop of LOOPS (a
 *    late report lands on the site, or just past a write, often enough), every value
 *    read back checked against the last one written (through MMIO or the helper,
 *    whichever the site is by then). Then for each site whether it was patched
 *    ("tpr: site NAME patched" / "not patched"). A seventh write runs with ESP = 0
 *    and must never be patched.
 * 2. A late report: one TPR write followed by 3,000 other instructions; its site must
 *    not be patched (the report names another instruction). And the interrupt case: TPR 0x60, a self-IPI at vector 0x50 must
 *    stay pending (not before), TPR 0x50 still masks it, TPR 0x40 delivers it at once
 *    (the helper's poll when patched); then it is counted once (never lost).
 * 3. The last TPR written is 0x20 (skiff's --stats shows KVM_GET_LAPIC's TPR), then
 *    "tpr: done failures=N" and power off by hypercall.
 */
        .set    TPR, 0xfee00080
        .set    SVR, 0xfee000f0
        .set    EOI, 0xfee000b0
        .set    ICR, 0xfee00300
        .set    HC_PAGE, 0xdf000
        .set    HC_POWEROFF, 0x5303
        .set    LOOPS, 10000
        .set    VEC, 0x50

        .code32
        .section .text
        .globl _start
_start:
        cli
        cld
        lgdt    gdt_desc
        ljmp    $0x08, $1f
1:      mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $kstack_top, %esp
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

        /* 1. Each form in a loop of its own (late reports land on one of its few
           instructions sooner or later), every value read back checked. */
        xor     %edi, %edi              /* failures */
        mov     $LOOPS, %esi
l_store_reg:
        mov     %esi, %ecx
        and     $0xf0, %ecx
site_store_reg:
        mov     %ecx, TPR               /* 89 0d */
        dec     %esi
        jnz     l_store_reg
        mov     $LOOPS, %esi
l_load_reg:
site_load_reg:
        mov     TPR, %edx               /* 8b 15 */
        cmp     %ecx, %edx
        jne     value_fail
        dec     %esi
        jnz     l_load_reg
        mov     $LOOPS, %esi
l_store_eax:
        mov     %esi, %eax
        and     $0xf0, %eax
        call    tpr_set                 /* a3, in a subroutine part 2 calls too */
        dec     %esi
        jnz     l_store_eax
        mov     $0x70, %eax
        call    tpr_set
        mov     $LOOPS, %esi
l_load_eax:
site_load_eax:
        mov     TPR, %eax               /* a1 */
        cmp     $0x70, %eax
        jne     value_fail
        dec     %esi
        jnz     l_load_eax
        mov     $LOOPS, %esi
l_store_imm:
site_store_imm:
        movl    $0x30, TPR              /* c7 05 */
        dec     %esi
        jnz     l_store_imm
        mov     $LOOPS, %esi
l_push:
site_push:
        pushl   TPR                     /* ff 35 */
        pop     %ebx
        cmp     $0x30, %ebx
        jne     value_fail
        dec     %esi
        jnz     l_push
        jmp     values_done
value_fail:
        inc     %edi
        dec     %esi
        jnz     value_fail_next
        jmp     values_done
value_fail_next:
        /* Count the rest of that loop as one failure: go on with the next case. */
        jmp     values_done
values_done:
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
        mov     %edi, failures
        mov     $s_values, %esi
        call    puts
        mov     %edi, %eax
        call    putdec
        mov     $10, %al
        call    putc
        /* Which sites were rewritten. */
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

        /* 2b. Interrupts: masked while the TPR's class is at or above VEC's. */
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
        mov     $0x40, %eax             /* below: delivered now */
        call    tpr_set
        mov     got, %eax               /* at once, before anything else runs */
        mov     $n_irq_at_lowering, %esi
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
        mov     $0x20, %eax
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

/* The TPR from EAX, and into EAX: sites parts 1 and 2 share. */
tpr_set:
site_store_eax:
        mov     %eax, TPR               /* a3 */
        ret
tpr_get:
        mov     TPR, %eax               /* a1 */
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

        .include "console.inc"

        .section .data
        .p2align 3
gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08 kernel code */
        .quad   0x00cf92000000ffff      /* 0x10 kernel data */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
idt_desc:
        .word   0x81 * 8 - 1
        .long   idt
got:    .long   0
ipi_return: .long 0
failures: .long 0
s_start:        .asciz "tpr: start\n"
s_values:       .asciz "tpr: value mismatches "
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
n_irq_at_lowering: .asciz "irq delivered at lowering"
n_irq_once:     .asciz "irq delivered once"
n_read_back:    .asciz "read back 0x40"

        .section .bss
        .p2align 12
idt:    .skip   0x81 * 8
        .p2align 4
        .skip   4096
kstack_top:

        .include "pvh_note.inc"
