/*
 * skiff's gdb test kernel (multiboot version 1, a 64-bit ELF with its symbols kept
 * for gdb). Entered in 32-bit protected mode, it maps its first 8 MiB, switches to
 * long mode and calls `tick` ROUNDS times in kernel mode (each adds one to
 * `counter` and copies it to `watched`, what the test's watchpoint sees). Then it
 * drops to user mode (CPL 3, IOPL 3), where `user_tick` copies `counter` to
 * `watched` ROUNDS times: the same debugging in user mode. Then it ends the
 * machine through QEMU's isa-debug-exit port 0xf4 (skiff --exit-device) with the
 * value 0x20 + `gdb_flag` (0 unless gdb wrote it: exit status (V << 1) | 1), or
 * 0x30 if `counter` is not ROUNDS. tests/gdb.rs drives it with gdb.
 */
        .set    EXIT_PORT, 0xf4
        .set    ROUNDS, 1000

        .include "multiboot.inc"
        /* PML4[0] -> PDPT, PDPT[0] -> PD, PD[0..3] = 2 MiB pages: 0-8 MiB */
        mov     $pdpt, %eax
        or      $7, %eax
        mov     %eax, pml4
        mov     $pd, %eax
        or      $7, %eax
        mov     %eax, pdpt
        xor     %ecx, %ecx
1:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x87, %eax             /* present, writable, user, 2 MiB */
        mov     %eax, pd(,%ecx,8)
        inc     %ecx
        cmp     $4, %ecx
        jb      1b
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     %cr4, %eax
        or      $0x20, %eax
        mov     %eax, %cr4
        mov     $0xc0000080, %ecx
        rdmsr
        or      $0x100, %eax
        wrmsr
        lgdt    gdt_desc
        mov     %cr0, %eax
        or      $0x80000001, %eax
        mov     %eax, %cr0
        ljmp    $0x08, $long_mode

        .code64
long_mode:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $stack_top, %rsp
        xor     %ebx, %ebx
2:      call    tick
        inc     %ebx
        cmp     $ROUNDS, %ebx
        jb      2b
        /* Held here while `hold` is not zero (a test sets it through gdb). */
6:      cmpl    $0, hold(%rip)
        jne     6b
        /* To user mode: IOPL 3 (its `out` ends the machine), interrupts off. */
        pushq   $0x1b                   /* SS: user data */
        pushq   $user_stack_top
        pushq   $0x3002                 /* RFLAGS: IOPL 3 */
        pushq   $0x23                   /* CS: user 64-bit code */
        pushq   $user_mode
        iretq

user_mode:
        xor     %ebx, %ebx
5:      call    user_tick
        inc     %ebx
        cmp     $ROUNDS, %ebx
        jb      5b
        mov     $0x30, %al
        cmpl    $ROUNDS, counter(%rip)
        jne     3f
        mov     gdb_flag(%rip), %al
        add     $0x20, %al
3:      out     %al, $EXIT_PORT
        mov     $0x604, %dx
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
4:      hlt
        jmp     4b

        .globl tick, user_tick
        .type tick, @function
tick:
        incl    counter(%rip)
        mov     counter(%rip), %eax
        mov     %eax, watched(%rip)
        ret
        .size tick, . - tick

        .type user_tick, @function
user_tick:
        mov     counter(%rip), %eax
        mov     %eax, watched(%rip)
        ret
        .size user_tick, . - user_tick

        .section .rodata
        .p2align 3
gdt:    .quad   0
        .quad   0x00af9b000000ffff      /* 0x08: 64-bit code */
        .quad   0x00cf93000000ffff      /* 0x10: data */
        .quad   0x00cff3000000ffff      /* 0x18: user data */
        .quad   0x00affb000000ffff      /* 0x20: user 64-bit code */
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt

        .section .data
        .p2align 3
        .globl counter, watched, gdb_flag, hold
counter:  .long 0
watched:  .long 0
gdb_flag: .long 0
hold:     .long 0

        .section .bss
        .p2align 12
pml4:   .skip   4096
pdpt:   .skip   4096
pd:     .skip   4096
stack:  .skip   4096
stack_top:
user_stack: .skip 4096
user_stack_top:
