/*
 * skiff's reboot-loop test kernel: boots BOOTS times in one skiff process, counting
 * itself in CMOS RAM bytes 0x38-0x39 (battery-backed: they survive a reset), printing
 * "rebootloop: boot N" each time and rebooting through the i8042 reset line, then
 * powers off through ACPI PM1a_CNT. Every boot prints, so this is a guest that reboots
 * often, not a reboot storm; skiff's memory must not grow with the number of reboots.
 * PVH entry: 32-bit protected mode, paging off, CPL 0.
 */
        .set    BOOTS, 5000
        .set    COUNTER, 0x38           /* CMOS RAM index of the counter's low byte */

        .code32
        .section .text
        .globl _start
_start:
        cld
        mov     $stack_top, %esp
        /* EBX = the 16-bit counter + 1, written back */
        mov     $COUNTER, %al
        out     %al, $0x70
        in      $0x71, %al
        movzbl  %al, %ebx
        mov     $(COUNTER + 1), %al
        out     %al, $0x70
        in      $0x71, %al
        movzbl  %al, %eax
        shl     $8, %eax
        or      %eax, %ebx
        inc     %ebx
        mov     $COUNTER, %al
        out     %al, $0x70
        mov     %bl, %al
        out     %al, $0x71
        mov     $(COUNTER + 1), %al
        out     %al, $0x70
        mov     %bh, %al
        out     %al, $0x71

        mov     $msg_boot, %esi
        call    puts
        mov     %ebx, %eax
        call    putdec
        mov     $'\n', %al
        call    putc
        mov     $0x440, %dx             /* boot marker */
        mov     $0x7b, %al
        out     %al, %dx

        cmp     $BOOTS, %ebx
        jae     poweroff
        mov     $0xfe, %al              /* i8042: pulse the reset line */
        out     %al, $0x64
        jmp     halt

poweroff:
        mov     $msg_done, %esi
        call    puts
        mov     $0x604, %dx             /* ACPI PM1a_CNT: SLP_TYP=5, SLP_EN */
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
halt:   hlt
        jmp     halt

        .include "console.inc"

        .section .rodata
msg_boot:   .asciz "rebootloop: boot "
msg_done:   .asciz "rebootloop: done\n"

        .section .bss
        .p2align 4
stack:  .skip   4096
stack_top:

        .include "pvh_note.inc"
