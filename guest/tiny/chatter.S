/*
 * skiff's chatter test kernel: prints "chatter: N ....." lines (N = 1, 2, 3, ...,
 * each line 100 bytes or so, its padding in one `rep outsb`) on COM1 forever, never
 * powering off. For the process tests: a console nobody reads (the
 * guest must block, and a stop must not), stop signals in the run phase, and that no
 * line is lost or garbled on the way out (the numbers are consecutive).
 * PVH entry: 32-bit protected mode, paging off, CPL 0.
 */
        .code32
        .section .text
        .globl _start
_start:
        cld
        mov     $stack_top, %esp
        mov     $1, %ebx
1:      mov     $msg, %esi
        call    puts
        mov     %ebx, %eax
        call    putdec
        mov     $pad, %esi
        mov     $(pad_end - pad), %ecx
        mov     $0x3f8, %dx
        rep outsb
        inc     %ebx
        jmp     1b

        .include "console.inc"

        .section .rodata
msg:    .asciz  "chatter: "
pad:    .ascii  " ........................................................................................\n"
pad_end:

        .section .bss
        .p2align 4
stack:  .skip   4096
stack_top:

        .include "pvh_note.inc"
