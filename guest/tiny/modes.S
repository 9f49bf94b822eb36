/*
 * skiff's paging-mode test kernels: one source, assembled once per mode with
 * --defsym MODE=n (0 real mode, 1 32-bit paging with a 4 MiB page, 2 PAE with a
 * 2 MiB page, 3 4-level long mode). Each enters its mode from the PVH entry (32-bit
 * protected mode, paging off), prints "modes: <mode>", loads an empty IDT and then
 * runs one instruction that faults. With no IDT the fault becomes a triple fault
 * (KVM_EXIT_SHUTDOWN), and skiff run --on-reboot exit must name that instruction:
 *   real mode  ud2 (#UD), or popcnt where KVM's emulator runs real mode (see below)
 *   32-bit     mov eax,[40000000h]         (#PF: PDE 256 not present)
 *   PAE        mov [80000000h],ebx         (#PF: PDPTE 2 not present)
 *   long mode  mov rcx,[rax]  rax=123456789000h   (#PF: PML4E 36 not present)
 * The kernel is linked at 1 MiB; the page tables identity-map its first 4 MiB.
 */
        .include "pvh_entry.inc"
        mov     $hello, %esi
        call    puts
        mov     $mode_name, %esi
        call    puts
        lidt    null_idt                /* limit 0: every exception escalates */

.if MODE == 0
        /* Real mode: through a 16-bit protected-mode segment (based at 1 MiB, where
           this code is), then clear PE. */
        ljmp    $0x18, $(2f - 0x100000)
        .code16
2:      mov     $0x20, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %cr0, %eax
        and     $~1, %eax
        mov     %eax, %cr0
        /* CS = 0xffff reaches 0xffff0..0x10ffef: this code, linked above 1 MiB. */
        ljmp    $0xffff, $(3f - 0xffff0)
3:      xor     %ax, %ax
        mov     %ax, %ds
        /* Where KVM delivers real-mode exceptions through the IVT whatever IDTR's
           limit says (its emulator does), #UD comes back here: point vector 6 at
           label 6 below. There `popcnt` fails KVM's emulator where it lacks it;
           skiff re-runs it once, then, not emulating it either, stops the machine
           and names it. Where the CPU runs real mode itself,
           popcnt runs, and ud2's #UD escalates to a triple fault (IDTR limit 0). */
        movw    $(6f - 0xffff0), 6*4
        movw    $0xffff, 6*4+2
6:      popcnt  %ax, %bx
        ud2
        .code32
.endif

.if MODE == 1
        /* 32-bit paging, CR4.PSE: PDE 0 maps 0-4 MiB with one 4 MiB page. */
        movl    $0x83, pd32
        mov     %cr4, %eax
        or      $0x10, %eax             /* PSE */
        mov     %eax, %cr4
        mov     $pd32, %eax
        mov     %eax, %cr3
        mov     %cr0, %eax
        or      $0x80000000, %eax       /* PG */
        mov     %eax, %cr0
        mov     0x40000000, %eax
.endif

.if MODE == 2
        /* PAE: PDPTE 0 -> PD; PD entries 0 and 1 map 0-4 MiB with 2 MiB pages. */
        movl    $pd, %eax
        or      $1, %eax
        movl    %eax, pdpt
        movl    $0x83, pd
        movl    $0x200083, pd + 8
        mov     %cr4, %eax
        or      $0x20, %eax             /* PAE */
        mov     %eax, %cr4
        mov     $pdpt, %eax
        mov     %eax, %cr3
        mov     %cr0, %eax
        or      $0x80000000, %eax
        mov     %eax, %cr0
        mov     $0x5a5a5a5a, %ebx
        mov     %ebx, 0x80000000
.endif

.if MODE == 3
        /* 4-level paging: PML4E 0 -> PDPT, PDPTE 0 -> PD, two 2 MiB pages. */
        movl    $pdpt64, %eax
        or      $3, %eax
        movl    %eax, pml4
        movl    $pd, %eax
        or      $3, %eax
        movl    %eax, pdpt64
        movl    $0x83, pd
        movl    $0x200083, pd + 8
        mov     %cr4, %eax
        or      $0x20, %eax             /* PAE */
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx       /* EFER.LME */
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000000, %eax
        mov     %eax, %cr0
        ljmp    $0x28, $4f
        .code64
4:      movabs  $0x123456789000, %rax
        mov     (%rax), %rcx
        .code32
.endif
5:      hlt
        jmp     5b

        .include "console.inc"

        .section .rodata
hello:  .asciz  "modes: "
mode_name:
.if MODE == 0
        .asciz  "real mode\n"
.endif
.if MODE == 1
        .asciz  "32-bit paging\n"
.endif
.if MODE == 2
        .asciz  "PAE paging\n"
.endif
.if MODE == 3
        .asciz  "4-level paging\n"
.endif
        .p2align 3
gdt:    .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08 code, 32-bit, flat */
        .quad   0x00cf92000000ffff      /* 0x10 data, flat */
        .quad   0x00009a100000ffff      /* 0x18 code, 16-bit, 64 KiB at 1 MiB */
        .quad   0x000092000000ffff      /* 0x20 data, 16-bit, 64 KiB */
        .quad   0x00af9a000000ffff      /* 0x28 code, 64-bit */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
null_idt:
        .word   0
        .long   0

        .section .bss
        .p2align 12
pml4:   .skip   4096
pdpt64: .skip   4096
pd:     .skip   4096
pd32:   .skip   4096
pdpt:   .skip   32
        .p2align 4
        .skip   4096
stack_top:

        .include "pvh_note.inc"
