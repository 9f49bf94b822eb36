/*
 * skiff's keyboard test kernel: drives the i8042 by polling, as a driver would
 * (controller self-test, keyboard ID, scanning on), prints each answer, prints
 * "kbd: ready", then prints every scan code the keyboard sends until it has 8 (one
 * Ctrl+Alt+Del in set 1) and powers off. For tests/snapshot.rs: the host's
 * SendCtrlAltDel reaches the guest's keyboard.
 * PVH entry: 32-bit protected mode, paging off, CPL 0.
 */
        .code32
        .section .text
        .globl _start
_start:
        cld
        mov     $stack_top, %esp
        mov     $0xaa, %al              /* controller self-test: 0x55 */
        call    command
        mov     $selftest, %esi
        call    answer
        mov     $0xf2, %al              /* keyboard ID: ack, 0xab, 0x83 */
        call    to_keyboard
        mov     $ident, %esi
        call    answer
        call    next_byte
        call    puthex
        call    next_byte
        call    puthex
        mov     $'\n', %al
        call    putc
        mov     $0xf4, %al              /* scanning on: ack */
        call    to_keyboard
        mov     $enable, %esi
        call    answer
        mov     $ready, %esi
        call    puts
        mov     $8, %ecx
1:      call    next_byte
        call    puthex
        mov     $' ', %al
        call    putc
        loop    1b
        mov     $done, %esi
        call    puts
        mov     $0x604, %dx             /* ACPI PM1a_CNT: SLP_TYP=5, SLP_EN */
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
2:      hlt
        jmp     2b

/* command: AL to the controller (port 0x64) */
command:
        call    wait_input
        out     %al, $0x64
        ret

/* to_keyboard: AL to the keyboard (port 0x60) */
to_keyboard:
        call    wait_input
        out     %al, $0x60
        ret

/* wait_input: until the controller's input buffer is empty (status bit 1) */
wait_input:
        push    %eax
1:      in      $0x64, %al
        test    $2, %al
        jnz     1b
        pop     %eax
        ret

/* next_byte: EAX = the next byte from the output buffer (status bit 0) */
next_byte:
1:      in      $0x64, %al
        test    $1, %al
        jz      1b
        xor     %eax, %eax
        in      $0x60, %al
        ret

/* answer: prints the label at ESI, then the next byte */
answer:
        call    puts
        call    next_byte
        call    puthex
        mov     $'\n', %al
        call    putc
        ret

        .include "console.inc"

        .section .rodata
selftest: .asciz "kbd: self-test "
ident:  .asciz  "kbd: id "
enable: .asciz  "kbd: enable "
ready:  .asciz  "kbd: ready\n"
done:   .asciz  "\nkbd: done\n"

        .section .bss
        .p2align 4
stack:  .skip   4096
stack_top:

        .include "pvh_note.inc"
