/*
 * skiff's tiny test kernel: the smallest guest that exercises a VMM's boot path.
 * It is an ELF with a PVH entry note (Xen's PHYS32_ENTRY), entered in 32-bit
 * protected mode with paging off, as the PVH ABI says. It prints one line on the
 * COM1 UART, writes skiff's boot-marker port, then powers off: first through QEMU's
 * isa-debug-exit port 0xf4 (ignored by skiff), then through ACPI PM1a_CNT at 0x604
 * with SLP_TYP=5 and SLP_EN (skiff's soft-off).
 */
        .code32
        .section .text
        .globl _start
_start:
        cld
        mov     $message, %esi
        mov     $0x3f8, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      mov     $0x440, %dx             /* boot marker */
        mov     $0x7b, %al
        out     %al, %dx
        mov     $0xf4, %dx              /* QEMU isa-debug-exit */
        xor     %eax, %eax
        out     %al, %dx
        mov     $0x604, %dx             /* ACPI PM1a_CNT: SLP_TYP=5, SLP_EN */
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
3:      hlt
        jmp     3b

        .section .rodata
message:
        .asciz  "tiny: hello from the tiny kernel\n"

        .include "pvh_note.inc"
