/*
 * skiff's multiboot reboot test kernel (ELF32): each boot counts itself in CMOS RAM
 * byte 0x38 (battery-backed: it survives a reset), checks the multiboot magic and
 * prints "mb-reboot: boot N"; boots 1 and 2 reboot (through the i8042, then through
 * 0xcf9), boot 3 ends the machine through the exit device (port 0xf4) with the value 3.
 * So an in-place reboot loads a multiboot kernel again and enters it as the first
 * boot did.
 */
        .set    COUNTER, 0x38

        .include "multiboot.inc"
        cmp     $0x2badb002, %eax
        jne     bad_magic
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
        mov     $'\n', %al
        call    putc
        cmp     $1, %ebx
        je      via_i8042
        cmp     $2, %ebx
        je      via_cf9
        mov     %bl, %al
        out     %al, $0xf4
        jmp     halt
via_i8042:
        mov     $0xfe, %al
        out     %al, $0x64
        jmp     halt
via_cf9:
        mov     $0xcf9, %dx
        mov     $0x06, %al
        out     %al, %dx
        jmp     halt
bad_magic:
        mov     $msg_magic, %esi
        call    puts
        mov     $0x7f, %al
        out     %al, $0xf4
halt:   hlt
        jmp     halt

        .include "console.inc"

        .section .rodata
msg_boot:  .asciz "mb-reboot: boot "
msg_magic: .asciz "mb-reboot: FAILED: EAX is not the multiboot magic\n"

        .section .bss
        .p2align 4
stack:  .skip   4096
stack_top:
