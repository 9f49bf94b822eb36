/*
 * skiff's echo test kernel: prints "echo: ready", then copies every byte the COM1
 * UART receives back to it, polling the line status register (no interrupts), until
 * it receives 0x04 (EOT); then prints "echo: done N" (N bytes echoed) and powers off.
 * For the test that host input reaches the guest whole and in order however much of
 * it arrives at once (tests/process.rs: the receive FIFO holds 64 bytes).
 * PVH entry: 32-bit protected mode, paging off, CPL 0.
 */
        .code32
        .section .text
        .globl _start
_start:
        cld
        mov     $stack_top, %esp
        mov     $ready, %esi
        call    puts
        xor     %ebx, %ebx              /* bytes echoed */
1:      mov     $0x3fd, %dx             /* line status: bit 0, data ready */
        in      %dx, %al
        test    $1, %al
        jz      1b
        mov     $0x3f8, %dx
        in      %dx, %al
        cmp     $0x04, %al
        je      2f
        call    putc
        inc     %ebx
        jmp     1b
2:      mov     $done, %esi
        call    puts
        mov     %ebx, %eax
        call    putdec
        mov     $'\n', %al
        call    putc
        mov     $0x604, %dx             /* ACPI PM1a_CNT: SLP_TYP=5, SLP_EN */
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
3:      hlt
        jmp     3b

        .include "console.inc"

        .section .rodata
ready:  .asciz  "echo: ready\n"
done:   .asciz  "echo: done "

        .section .bss
        .p2align 4
stack:  .skip   4096
stack_top:

        .include "pvh_note.inc"
