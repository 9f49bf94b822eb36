/*
 * skiff's triple-fault test kernel: faults with an empty IDT at its first
 * instruction, silently, so every boot ends in a triple fault and (with the default
 * --on-reboot reset) a reboot: the reboot storm a truncated or broken kernel causes.
 * skiff must stop the storm and name it.
 * PVH entry: 32-bit protected mode, paging off, CPL 0.
 */
        .code32
        .section .text
        .globl _start
_start:
        lidt    empty_idt
        int3
1:      hlt
        jmp     1b

        .section .rodata
        .p2align 3
empty_idt:
        .word   0
        .long   0

        .include "pvh_note.inc"
