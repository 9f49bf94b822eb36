/*
 * skiff's reboot test kernel. Each boot it:
 *   - counts itself in CMOS RAM byte 0x38 (battery-backed: survives a reset),
 *   - prints the MTRRs it finds (IA32_MTRR_DEF_TYPE and PHYSMASK0: after a reset both
 *     must be back to their RESET values, E and the valid bit clear),
 *   - writes skiff's boot marker (port 0x440: the reboot benchmark's finish line),
 *   - programs the MTRRs (default type WB with E and FE set, range 0 valid) and prints
 *     what it reads back, so the next boot has something to prove cleared,
 *   - reboots through a different path each time: the i8042 reset line, the 0xcf9
 *     reset control register (also the FADT's ACPI reset register), or a triple fault;
 * and after BOOTS boots it powers off through ACPI PM1a_CNT (S5).
 * PVH entry: 32-bit protected mode, paging off, CPL 0.
 */
        .set    BOOTS, 10
        .set    COUNTER, 0x38           /* CMOS RAM index of the boot counter */

        .code32
        .section .text
        .globl _start
_start:
        cld
        mov     $stack_top, %esp

        /* count this boot */
        mov     $COUNTER, %al
        out     %al, $0x70
        in      $0x71, %al
        movzbl  %al, %ebx
        inc     %ebx
        mov     $COUNTER, %al
        out     %al, $0x70
        mov     %bl, %al
        out     %al, $0x71

        mov     $msg_boot, %esi
        call    puts
        mov     %ebx, %eax
        call    putdec
        mov     $msg_found, %esi
        call    puts
        call    print_mtrrs

        mov     $0x440, %dx             /* boot marker */
        mov     $0x7b, %al
        out     %al, %dx

        cmp     $BOOTS, %ebx
        jae     poweroff

        /* program: PHYSBASE0 = 0 (WB), PHYSMASK0 = valid, DEF_TYPE = E | FE | WB */
        mov     $0x200, %ecx
        mov     $6, %eax
        xor     %edx, %edx
        wrmsr
        mov     $0x201, %ecx
        mov     $0xf0000800, %eax
        xor     %edx, %edx
        wrmsr
        mov     $0x2ff, %ecx
        mov     $0xc06, %eax
        xor     %edx, %edx
        wrmsr
        mov     $msg_set, %esi
        call    puts
        call    print_mtrrs

        /* reboot path: boot % 3 */
        mov     %ebx, %eax
        xor     %edx, %edx
        mov     $3, %ecx
        div     %ecx
        cmp     $1, %edx
        je      via_i8042
        cmp     $2, %edx
        je      via_cf9
        /* triple fault: an empty IDT, then an exception */
        mov     $msg_triple, %esi
        call    puts
        lidt    empty_idt
        int3
        jmp     halt

via_i8042:
        mov     $msg_i8042, %esi
        call    puts
        mov     $0xfe, %al
        out     %al, $0x64
        jmp     halt

via_cf9:
        mov     $msg_cf9, %esi
        call    puts
        mov     $0xcf9, %dx
        mov     $0x06, %al
        out     %al, %dx
        jmp     halt

poweroff:
        mov     $msg_done, %esi
        call    puts
        mov     $0x604, %dx             /* ACPI PM1a_CNT: SLP_TYP=5, SLP_EN */
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
halt:   hlt
        jmp     halt

/* " def=XXXXXXXX mask0=XXXXXXXX\n" from the MSRs */
print_mtrrs:
        mov     $msg_def, %esi
        call    puts
        mov     $0x2ff, %ecx
        rdmsr
        call    puthex
        mov     $msg_mask, %esi
        call    puts
        mov     $0x201, %ecx
        rdmsr
        call    puthex
        mov     $'\n', %al
        call    putc
        ret

        .include "console.inc"

        .section .rodata
msg_boot:   .asciz "reboot-test: boot "
msg_found:  .asciz " found"
msg_set:    .asciz "reboot-test: programmed"
msg_def:    .asciz " def="
msg_mask:   .asciz " mask0="
msg_i8042:  .asciz "reboot-test: rebooting through the i8042\n"
msg_cf9:    .asciz "reboot-test: rebooting through 0xcf9\n"
msg_triple: .asciz "reboot-test: rebooting by triple fault\n"
msg_done:   .asciz "reboot-test: done\n"
        .p2align 3
empty_idt:
        .word   0
        .long   0

        .section .bss
        .p2align 4
stack:  .skip   4096
stack_top:

        .include "pvh_note.inc"
