/*
 * skiff's hostile test kernel for its instruction emulator. It enters 64-bit long
 * mode at CPL 0 (where this host's KVM emulates every instruction and gives up on
 * the XSAVE family, cmpxchg16b, ldmxcsr/stmxcsr, invpcid and icebp, so
 * skiff's emulator runs them), then runs one case a line:
 *     <name>: ok [values]             the instruction completed
 *     <name>: #<vector> err=<hex>     it raised that exception (cr2=<hex> for #PF)
 * An exception handler prints the second form and resumes after the case.
 * tests/emulate.rs runs it and compares every line with what hardware does.
 *
 * Memory map (identity unless said): 0-4 MiB with 2 MiB pages; 4 MiB+ with 4 KiB
 * pages: 0x400000 RAM, 0x401000 not present, 0x402000 RAM, 0x403000 -> 0x405000;
 * 0x20000000 (past RAM, nothing there) and 0xdf000000 (the MMIO hole, where no device is) with 2 MiB
 * pages, present and writable.
 */
        .include "pvh_entry.inc"
        call    build_tables
        mov     %cr4, %eax
        or      $0x40620, %eax          /* PAE, OSFXSR, OSXMMEXCPT, OSXSAVE */
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx       /* EFER.LME */
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80010022, %eax       /* PG, WP, NE, MP */
        and     $~0xc, %eax             /* EM and TS clear */
        mov     %eax, %cr0
        ljmp    $0x18, $long_mode

/* Page tables: see the map above. */
build_tables:
        movl    $(pdpt + 3), pml4
        movl    $(pd0 + 3), pdpt
        movl    $(pd3 + 3), pdpt + 3*8
        movl    $0x000083, pd0
        movl    $0x200083, pd0 + 8
        movl    $(pt4 + 3), pd0 + 2*8
        movl    $0x20000083, pd0 + 256*8
        movl    $0xdf000083, pd3 + 248*8
        movl    $0x400003, pt4
        movl    $0x402003, pt4 + 2*8
        movl    $0x405003, pt4 + 3*8
        ret

        .code64
long_mode:
        mov     $0x20, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        lea     stack_top(%rip), %rsp
        call    build_idt
        lidt    idt_desc(%rip)
        lea     hello(%rip), %rsi
        call    puts
        /* XCR0: x87, SSE and AVX where CPUID offers AVX (leaf 0xD, EAX). */
        mov     $0xd, %eax
        xor     %ecx, %ecx
        cpuid
        and     $7, %eax
        xor     %edx, %edx
        xor     %ecx, %ecx
        xsetbv
        lea     s_xcr0(%rip), %rsi
        call    puts
        call    puthex
        call    newline

.macro CASE name
        lea     \name(%rip), %rsi
        call    puts
        lea     9f(%rip), %rax
        mov     %rax, resume_rip(%rip)
        mov     %rsp, resume_rsp(%rip)
.endm
.macro OK
        lea     s_ok(%rip), %rsi
        call    puts
.endm
.macro END
        call    newline
9:
.endm
/* RFBM = everything (EDX:EAX all ones). */
.macro ALL
        mov     $-1, %eax
        mov     $-1, %edx
.endm

        /* A present, writable mapping of an address with no RAM behind it must not
           page-fault: the access goes to the bus, where nothing answers (reads are
           all ones, writes vanish). */
        CASE    n_cx16_hole
        mov     $0x20000000, %rdi
        mov     $-1, %rax
        mov     $-1, %rdx
        xor     %ebx, %ebx
        xor     %ecx, %ecx
        lock cmpxchg16b (%rdi)
        setz    %bl
        OK
        call    print_zf
        END

        CASE    n_cx16_mmio
        mov     $0xdf000000, %rdi
        xor     %eax, %eax
        xor     %edx, %edx
        lock cmpxchg16b (%rdi)
        setz    %bl
        OK
        call    print_zf
        mov     %eax, %eax
        call    space_hex
        END

        CASE    n_xsave_hole
        ALL
        xsave64 0x20000000
        OK
        END

        CASE    n_xsave_mmio
        ALL
        mov     $0xdf000000, %rdi
        xsave64 (%rdi)
        OK
        END

        /* One instruction completed 2000 times in a row with no other exit in
           between (as a kernel's xsave at every context switch is, when its I/O
           goes through ioeventfds): progress, never "stuck at the same place". */
        CASE    n_xsave_loop
        mov     $2000, %ecx
        lea     area(%rip), %rdi
1:      ALL
        xsave64 (%rdi)
        dec     %ecx
        jnz     1b
        OK
        END

        /* The header reads as all ones: hardware refuses it with #GP(0). */
        CASE    n_xrstor_mmio
        ALL
        mov     $0xdf000000, %rdi
        xrstor64 (%rdi)
        OK
        END

        /* A valid area (saved just now) with MXCSR given a reserved bit. */
        CASE    n_xrstor_mxcsr
        ALL
        lea     area(%rip), %rdi
        xsave64 (%rdi)
        movl    $0x10000, 24(%rdi)
        xrstor64 (%rdi)
        OK
        END

        /* XSTATE_BV naming PKRU (bit 9), which XCR0 never has here. */
        CASE    n_xrstor_bv
        ALL
        lea     area(%rip), %rdi
        movl    $0x1f80, 24(%rdi)
        orl     $0x200, 512(%rdi)
        xrstor64 (%rdi)
        OK
        END

        /* A valid restore, for contrast. */
        CASE    n_xrstor_good
        ALL
        lea     area(%rip), %rdi
        andl    $~0x200, 512(%rdi)
        xrstor64 (%rdi)
        OK
        END

        CASE    n_invpcid
        mov     $4, %eax
        lea     area(%rip), %rdi
        movq    $0, (%rdi)
        movq    $0, 8(%rdi)
        invpcid (%rdi), %rax
        OK
        END

        CASE    n_icebp
        .byte   0xf1
        OK
        END

        /* MXCSR loaded by an emulated ldmxcsr reads back through stmxcsr, and is
           what xsave stores. */
        CASE    n_mxcsr
        movl    $0x1fa0, scratch(%rip)
        ldmxcsr scratch(%rip)
        movl    $0, scratch(%rip)
        stmxcsr scratch(%rip)
        OK
        mov     scratch(%rip), %eax
        call    space_hex
        ALL
        lea     area(%rip), %rdi
        xsave64 (%rdi)
        mov     24(%rdi), %eax
        call    space_hex
        mov     $0x1f80, %eax
        mov     %eax, scratch(%rip)
        ldmxcsr scratch(%rip)
        END

        /* stmxcsr across a page boundary (0x402ffe..0x403001, the second half
           physically at 0x405000): two translated halves. */
        CASE    n_stmxcsr_cross
        stmxcsr 0x402ffe
        OK
        movzwl  0x402ffe, %eax
        call    space_hex
        movzwl  0x403000, %eax
        call    space_hex
        END

        /* XSAVEC writes the compacted area only: an area ending right where a
           not-present page begins (the standard form would reach into it). */
        CASE    n_xsavec_size
        ALL
        mov     $0x401000 - 576 - 256, %rdi
        xsavec64 (%rdi)
        OK
        END

        /* A not-present page: #PF with CR2 and a write's error code (2). */
        CASE    n_xsave_notpresent
        ALL
        xsave64 0x401000
        OK
        END

        /* XRSTOR from an area crossing into the not-present page: the fault names
           the second page. */
        CASE    n_xrstor_cross_notpresent
        ALL
        mov     $0x401000 - 512, %rdi
        xrstor64 (%rdi)
        OK
        END

        lea     bye(%rip), %rsi
        call    puts
        mov     $0x604, %dx             /* ACPI PM1a_CNT: SLP_TYP=5, SLP_EN */
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
2:      hlt
        jmp     2b

/* " zf=<0|1>" from BL (set from ZF right after the instruction). */
print_zf:
        push    %rax
        lea     s_zf(%rip), %rsi
        call    puts
        mov     %bl, %al
        add     $'0', %al
        call    putc
        pop     %rax
        ret

/* The IDT: 32 gates to stubs 16 bytes apart. */
build_idt:
        lea     idt(%rip), %rdi
        lea     stubs(%rip), %rax
        mov     $32, %ecx
1:      mov     %ax, (%rdi)
        movw    $0x18, 2(%rdi)
        movw    $0x8e00, 4(%rdi)
        mov     %rax, %rdx
        shr     $16, %rdx
        mov     %dx, 6(%rdi)
        shr     $16, %rdx
        mov     %edx, 8(%rdi)
        movl    $0, 12(%rdi)
        add     $16, %rdi
        add     $16, %rax
        loop    1b
        ret

        .balign 16
stubs:
        .set    vec, 0
        .rept   32
        .balign 16
        .if     vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21
        push    $vec
        .else
        push    $0
        push    $vec
        .endif
        jmp     exception
        .set    vec, vec + 1
        .endr

/* Prints " #<vector> err=<code>" (and " cr2=<addr>" for #PF), then resumes the
   case's end with the case's stack. */
exception:
        lea     s_hash(%rip), %rsi
        call    puts
        mov     (%rsp), %eax
        call    putdec
        lea     s_err(%rip), %rsi
        call    puts
        mov     8(%rsp), %eax
        call    puthex
        cmpq    $14, (%rsp)
        jne     1f
        lea     s_cr2(%rip), %rsi
        call    puts
        mov     %cr2, %rax
        call    puthex64
1:      call    newline
        mov     resume_rsp(%rip), %rsp
        jmp     *resume_rip(%rip)

/* Console, 64-bit: each routine keeps every register but RSI (puts advances it). */
putc:
        push    %rdx
        mov     $0x3f8, %dx
        out     %al, %dx
        pop     %rdx
        ret
puts:
        push    %rax
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc
        jmp     1b
2:      pop     %rax
        ret
newline:
        push    %rax
        mov     $'\n', %al
        call    putc
        pop     %rax
        ret
space_hex:
        push    %rax
        mov     $' ', %al
        call    putc
        pop     %rax
/* puthex: EAX in hex, no leading zeros */
puthex:
        push    %rax
        mov     %eax, %eax
        call    puthex64
        pop     %rax
        ret
puthex64:
        push    %rax
        push    %rcx
        push    %rdx
        mov     %rax, %rdx
        mov     $16, %ecx
        xor     %r8d, %r8d              /* a digit printed yet */
1:      rol     $4, %rdx
        mov     %dl, %al
        and     $0xf, %al
        jnz     2f
        test    %r8d, %r8d
        jnz     2f
        cmp     $1, %ecx
        jne     4f
2:      mov     $1, %r8d
        add     $'0', %al
        cmp     $'9', %al
        jbe     3f
        add     $('a' - '9' - 1), %al
3:      call    putc
4:      loop    1b
        pop     %rdx
        pop     %rcx
        pop     %rax
        ret
putdec:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rbx
        mov     %eax, %eax
        xor     %ecx, %ecx
        mov     $10, %ebx
1:      xor     %edx, %edx
        div     %rbx
        push    %rdx
        inc     %ecx
        test    %rax, %rax
        jnz     1b
2:      pop     %rax
        add     $'0', %al
        call    putc
        loop    2b
        pop     %rbx
        pop     %rdx
        pop     %rcx
        pop     %rax
        ret

        .section .rodata
hello:  .asciz  "emulate: long mode\n"
bye:    .asciz  "emulate: done\n"
s_xcr0: .asciz  "xcr0="
s_ok:   .asciz  " ok"
s_zf:   .asciz  " zf="
s_hash: .asciz  " #"
s_err:  .asciz  " err="
s_cr2:  .asciz  " cr2="
n_cx16_hole:    .asciz "cmpxchg16b-hole:"
n_cx16_mmio:    .asciz "cmpxchg16b-mmio:"
n_xsave_hole:   .asciz "xsave-hole:"
n_xsave_mmio:   .asciz "xsave-mmio:"
n_xsave_loop:   .asciz "xsave-2000-times:"
n_xrstor_mmio:  .asciz "xrstor-mmio:"
n_xrstor_mxcsr: .asciz "xrstor-reserved-mxcsr:"
n_xrstor_bv:    .asciz "xrstor-xstate-bv-outside-xcr0:"
n_xrstor_good:  .asciz "xrstor-valid:"
n_invpcid:      .asciz "invpcid-type-4:"
n_icebp:        .asciz "icebp:"
n_mxcsr:        .asciz "ldmxcsr-stmxcsr-xsave:"
n_stmxcsr_cross: .asciz "stmxcsr-page-crossing:"
n_xsavec_size:  .asciz "xsavec-compacted-size:"
n_xsave_notpresent: .asciz "xsave-not-present:"
n_xrstor_cross_notpresent: .asciz "xrstor-second-page-not-present:"

        .p2align 3
gdt:    .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08 code, 32-bit, flat */
        .quad   0x00cf92000000ffff      /* 0x10 data, flat */
        .quad   0x00af9a000000ffff      /* 0x18 code, 64-bit */
        .quad   0x00cf92000000ffff      /* 0x20 data */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .quad   gdt
idt_desc:
        .word   32 * 16 - 1
        .quad   idt

        .section .bss
        .p2align 12
pml4:   .skip   4096
pdpt:   .skip   4096
pd0:    .skip   4096
pd3:    .skip   4096
pt4:    .skip   4096
idt:    .skip   32 * 16
        .p2align 6
area:   .skip   4096
scratch: .skip  8
resume_rip: .skip 8
resume_rsp: .skip 8
        .p2align 4
        .skip   8192
stack_top:

        .include "pvh_note.inc"
