/*
 * skiff's gdb test kernel (multiboot version 1, a 64-bit ELF with its symbols kept
 * for gdb). Entered in 32-bit protected mode, it maps its first 8 MiB, switches to
 * long mode and calls `tick` ROUNDS times; each call adds one to `counter` and
 * copies it to `watched` (what the test's watchpoint sees). Then it ends the machine
 * through QEMU's isa-debug-exit port 0xf4 (skiff --exit-device) with the value
 * 0x20 + `gdb_flag` (0 unless gdb wrote it: exit status (V << 1) | 1), or 0x30 if
 * `counter` is not ROUNDS at the end. tests/gdb.rs drives it with gdb.
 */
        .set    MB_MAGIC, 0x1badb002
        .set    MB_FLAGS, 0x00000003
        .set    EXIT_PORT, 0xf4
        .set    ROUNDS, 1000

        .code32
        .section .text
        .p2align 2
mb_header:
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)

        .globl _start
_start:
        cli
        cld
        mov     $stack_top, %esp
        /* PML4[0] -> PDPT, PDPT[0] -> PD, PD[0..3] = 2 MiB pages: 0-8 MiB */
        mov     $pdpt, %eax
        or      $3, %eax
        mov     %eax, pml4
        mov     $pd, %eax
        or      $3, %eax
        mov     %eax, pdpt
        xor     %ecx, %ecx
1:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x83, %eax
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

        .globl tick
        .type tick, @function
tick:
        incl    counter(%rip)
        mov     counter(%rip), %eax
        mov     %eax, watched(%rip)
        ret
        .size tick, . - tick

        .section .rodata
        .p2align 3
gdt:    .quad   0
        .quad   0x00af9b000000ffff      /* 0x08: 64-bit code */
        .quad   0x00cf93000000ffff      /* 0x10: data */
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt

        .section .data
        .p2align 3
        .globl counter, watched, gdb_flag
counter:  .long 0
watched:  .long 0
gdb_flag: .long 0

        .section .bss
        .p2align 12
pml4:   .skip   4096
pdpt:   .skip   4096
pd:     .skip   4096
stack:  .skip   4096
stack_top:
