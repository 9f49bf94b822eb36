/*
 * skiff's multiboot long-mode test kernel (multiboot version 1; built as ELF32, the
 * form GRUB and QEMU take, and as ELF64 from the same source). Entered in 32-bit
 * protected mode with paging off, EAX = 0x2BADB002, EBX = the information structure,
 * it checks the magic, builds page tables for its first 8 MiB, switches to long mode,
 * checks it is there (EFER.LMA, a 64-bit register), prints one line on COM1 and ends
 * the machine through QEMU's isa-debug-exit port 0xf4 (skiff --exit-device):
 *   value 0x21 (exit status 67): long mode reached;
 *   value 0x30 (exit status 97): a check failed (the line says which).
 * Without an exit device it then powers off through ACPI PM1a_CNT.
 */
        .set    EXIT_PORT, 0xf4
        .set    EXIT_OK, 0x21
        .set    EXIT_FAIL, 0x30

        .include "multiboot.inc"
        cmp     $0x2badb002, %eax
        je      1f
        mov     $msg_magic, %esi
        jmp     fail32
1:      /* PML4[0] -> PDPT, PDPT[0] -> PD, PD[0..3] = 2 MiB pages: 0-8 MiB */
        mov     $pdpt, %eax
        or      $3, %eax
        mov     %eax, pml4
        mov     $pd, %eax
        or      $3, %eax
        mov     %eax, pdpt
        xor     %ecx, %ecx
2:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x83, %eax             /* present, writable, 2 MiB */
        mov     %eax, pd(,%ecx,8)
        inc     %ecx
        cmp     $4, %ecx
        jb      2b
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     %cr4, %eax
        or      $0x20, %eax             /* PAE */
        mov     %eax, %cr4
        mov     $0xc0000080, %ecx       /* EFER.LME */
        rdmsr
        or      $0x100, %eax
        wrmsr
        lgdt    gdt_desc
        mov     %cr0, %eax
        or      $0x80000001, %eax       /* PG, PE */
        mov     %eax, %cr0
        ljmp    $0x08, $long_mode

fail32: call    puts
        mov     $EXIT_FAIL, %al
        out     %al, $EXIT_PORT
        jmp     poweroff32

poweroff32:
        mov     $0x604, %dx             /* ACPI PM1a_CNT: SLP_TYP=5, SLP_EN */
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
3:      hlt
        jmp     3b

        .include "console.inc"

        .code64
long_mode:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0xc0000080, %ecx       /* EFER.LMA must be set */
        rdmsr
        bt      $10, %eax
        jnc     4f
        movabs  $0x123456789, %rax      /* a 64-bit register holds 64 bits */
        shr     $32, %rax
        cmp     $1, %rax
        jne     4f
        lea     msg_ok(%rip), %rsi
        call    puts64
        mov     $EXIT_OK, %al
        out     %al, $EXIT_PORT
        jmp     poweroff64
4:      lea     msg_nolong(%rip), %rsi
        call    puts64
        mov     $EXIT_FAIL, %al
        out     %al, $EXIT_PORT
poweroff64:
        mov     $0x604, %dx
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
5:      hlt
        jmp     5b

/* puts64: the NUL-terminated string at RSI to COM1 */
puts64:
        mov     $0x3f8, %dx
6:      lodsb
        test    %al, %al
        jz      7f
        out     %al, %dx
        jmp     6b
7:      ret

        .section .rodata
msg_magic:  .asciz "mb-long: FAILED: EAX is not the multiboot magic 0x2badb002\n"
msg_ok:     .asciz "mb-long: in long mode\n"
msg_nolong: .asciz "mb-long: FAILED: not in long mode\n"
        .p2align 3
gdt:    .quad   0
        .quad   0x00af9b000000ffff      /* 0x08: 64-bit code */
        .quad   0x00cf93000000ffff      /* 0x10: data */
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt

        .section .bss
        .p2align 12
pml4:   .skip   4096
pdpt:   .skip   4096
pd:     .skip   4096
stack:  .skip   4096
stack_top:
