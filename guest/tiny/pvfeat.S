/*
 * skiff's paravirtual-feature test kernel (tests/pvfeatures.rs). 32-bit protected
 * mode, paging off, CPL 0, an IDT whose #GP handler (vector 13) notes the fault and
 * steps over the faulting 2-byte wrmsr.
 *
 * It reads KVM's leaves (0x40000000 signature, 0x40000001 features), then writes
 * every paravirtual MSR once with a harmless value: an MSR whose feature CPUID lists
 * must be taken, one whose feature it does not must raise #GP (what KVM's
 * KVM_CAP_ENFORCE_PV_FEATURE_CPUID gives; without it the write is taken and the
 * guest would use a feature nobody checked). Where kvmclock and steal time are
 * exposed it turns them on and checks KVM filled their records. One line per case,
 * "pv: NAME ok" or "pv: NAME FAIL"; boot 1 reboots (port 0xcf9) and boot 2 does it
 * all again (CMOS byte 0x39 counts boots), then "pv: done failures=N" and power off.
 * Built with WAIT=1 (pvfeat-wait.elf), boot 1 first says "pv: waiting for a key" and
 * waits for a byte on COM1: a test snapshots it there and restores it elsewhere.
 */
.ifndef WAIT
        .set    WAIT, 0
.endif
        .set    BOOTS, 0x39
        .set    PVCLOCK, 0x200000       /* 32-byte kvmclock record */
        .set    WALLCLOCK, 0x200040
        .set    STEAL, 0x200080         /* 64-byte aligned steal-time record */

        .include "pvh_entry.inc"
        /* IDT entry 13: a 32-bit interrupt gate to gp_handler. */
        mov     $gp_handler, %eax
        mov     %ax, idt + 13 * 8
        movw    $0x08, idt + 13 * 8 + 2
        movw    $0x8e00, idt + 13 * 8 + 4
        shr     $16, %eax
        mov     %ax, idt + 13 * 8 + 6
        lidt    idt_desc

        mov     $BOOTS, %al
        out     %al, $0x70
        in      $0x71, %al
        movzbl  %al, %eax
        mov     %eax, boot
        inc     %al
        mov     %al, %bl
        mov     $BOOTS, %al
        out     %al, $0x70
        mov     %bl, %al
        out     %al, $0x71

        mov     $s_boot, %esi
        call    puts
        mov     boot, %eax
        call    putdec
        mov     $'\n', %al
        call    putc

.if WAIT
        cmpl    $0, boot
        jne     1f
        mov     $s_wait, %esi
        call    puts
        mov     $0x3fd, %dx             /* line status: data ready? */
2:      in      %dx, %al
        test    $1, %al
        jz      2b
        mov     $0x3f8, %dx
        in      %dx, %al
1:
.endif
        mov     $0x40000000, %eax
        cpuid
        cmp     $0x4b4d564b, %ebx       /* "KVMK" */
        jne     no_kvm
        mov     $0x40000001, %eax
        cpuid
        mov     %eax, features
        mov     $s_features, %esi
        call    puts
        mov     features, %eax
        call    puthex
        mov     $'\n', %al
        call    putc

        /* Every PV MSR: taken when its feature is listed, #GP when not. */
        mov     $msr_table, %edi
2:      mov     (%edi), %ecx            /* MSR index; 0 ends the table */
        test    %ecx, %ecx
        jz      3f
        movl    $0, faulted
        mov     8(%edi), %eax           /* value */
        xor     %edx, %edx
        wrmsr                           /* gp_handler steps over it */
        mov     4(%edi), %ecx           /* feature bit */
        mov     features, %eax
        shr     %cl, %eax
        and     $1, %eax                /* 1: listed */
        mov     12(%edi), %esi          /* name */
        call    puts
        mov     $s_listed, %esi
        test    %eax, %eax
        jnz     4f
        mov     $s_hidden, %esi
4:      call    puts
        /* listed xor faulted must be 1 */
        xor     faulted, %eax
        call    result
        add     $16, %edi
        jmp     2b
3:
        /* kvmclock on, when listed: KVM fills the record before the guest runs on. */
        testl   $(1 << 3), features
        jz      5f
        mov     $0x4b564d00, %ecx
        mov     $WALLCLOCK, %eax
        xor     %edx, %edx
        wrmsr
        mov     $0x4b564d01, %ecx
        mov     $(PVCLOCK | 1), %eax
        wrmsr
        mov     $s_clock, %esi          /* the console write exits: the record is in */
        call    puts
        mov     PVCLOCK, %eax           /* version: even, not 0 */
        test    $1, %eax
        jnz     6f
        test    %eax, %eax
        jz      6f
        mov     PVCLOCK + 24, %eax      /* tsc_to_system_mul */
        test    %eax, %eax
        jz      6f
        mov     WALLCLOCK + 4, %eax     /* seconds since 1970 */
        cmp     $1000000000, %eax
        jb      6f
        mov     $1, %eax
        jmp     7f
6:      xor     %eax, %eax
7:      call    result
        mov     $0x4b564d01, %ecx       /* off again */
        xor     %eax, %eax
        xor     %edx, %edx
        wrmsr
5:
        /* Steal time on, when listed: the record's version moves. */
        testl   $(1 << 5), features
        jz      8f
        mov     $0x4b564d03, %ecx
        mov     $(STEAL | 1), %eax
        xor     %edx, %edx
        wrmsr
        mov     $s_steal, %esi
        call    puts
        mov     STEAL + 8, %eax
        test    %eax, %eax
        setnz   %al
        movzbl  %al, %eax
        call    result
        mov     $0x4b564d03, %ecx
        xor     %eax, %eax
        xor     %edx, %edx
        wrmsr
8:
        cmpl    $0, boot
        jne     9f
        mov     $s_reboot, %esi
        call    puts
        mov     $0xcf9, %dx             /* reset control: full reset */
        mov     $0x06, %al
        out     %al, %dx
        jmp     halt
9:      mov     $s_done, %esi
        call    puts
        mov     failures, %eax
        call    putdec
        mov     $'\n', %al
        call    putc
        mov     $0x604, %dx             /* ACPI PM1a_CNT: SLP_TYP=5, SLP_EN */
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
halt:   hlt
        jmp     halt

no_kvm: mov     $s_no_kvm, %esi
        call    puts
        incl    failures
        jmp     9b

/* result: EAX 1 prints " ok", else " FAIL" (counted); then a newline. */
result:
        push    %esi
        mov     $s_ok, %esi
        test    %eax, %eax
        jnz     1f
        incl    failures
        mov     $s_fail, %esi
1:      call    puts
        pop     %esi
        ret

/* #GP: note it and step over the 2-byte wrmsr. The error code goes first. Back
 * without iret (KVM's emulator fails on it where guest kernel mode is emulated):
 * same privilege, interrupts stay off, so popping EIP, CS and EFLAGS and jumping
 * does what iret would. */
gp_handler:
        add     $4, %esp
        movl    $1, faulted
        popl    gp_return
        add     $8, %esp
        addl    $2, gp_return
        jmp     *gp_return

        .include "console.inc"

        .section .rodata
        /* index, feature bit, value written, name */
msr_table:
        .long   0x11, 0, WALLCLOCK, n_wall
        .long   0x12, 0, 0, n_system
        .long   0x4b564d00, 3, WALLCLOCK, n_wall_new
        .long   0x4b564d01, 3, 0, n_system_new
        .long   0x4b564d02, 4, 0, n_apf
        .long   0x4b564d03, 5, 0, n_steal
        .long   0x4b564d04, 6, 0, n_eoi
        .long   0x4b564d05, 12, 1, n_poll
        .long   0x4b564d06, 14, 0, n_apf_int
        .long   0x4b564d07, 14, 0, n_apf_ack
        .long   0x4b564d08, 17, 0, n_migration
        .long   0, 0, 0, 0
n_wall:         .asciz  "pv: msr 0x11 wall clock (clocksource)"
n_system:       .asciz  "pv: msr 0x12 system time (clocksource)"
n_wall_new:     .asciz  "pv: msr 0x4b564d00 wall clock (clocksource2)"
n_system_new:   .asciz  "pv: msr 0x4b564d01 system time (clocksource2)"
n_apf:          .asciz  "pv: msr 0x4b564d02 async pf (async_pf)"
n_steal:        .asciz  "pv: msr 0x4b564d03 steal time (steal_time)"
n_eoi:          .asciz  "pv: msr 0x4b564d04 pv eoi (pv_eoi)"
n_poll:         .asciz  "pv: msr 0x4b564d05 poll control (poll_control)"
n_apf_int:      .asciz  "pv: msr 0x4b564d06 async pf int (async_pf_int)"
n_apf_ack:      .asciz  "pv: msr 0x4b564d07 async pf ack (async_pf_int)"
n_migration:    .asciz  "pv: msr 0x4b564d08 migration control (migration_control)"
s_listed:       .asciz  " listed, taken"
s_hidden:       .asciz  " hidden, #GP"
s_ok:           .asciz  " ok\n"
s_fail:         .asciz  " FAIL\n"
s_boot:         .asciz  "pv: boot "
s_features:     .asciz  "pv: features "
s_clock:        .asciz  "pv: kvmclock record filled"
s_steal:        .asciz  "pv: steal-time record written"
s_reboot:       .asciz  "pv: rebooting\n"
s_wait:         .asciz  "pv: waiting for a key\n"
s_done:         .asciz  "pv: done failures="
s_no_kvm:       .asciz  "pv: no KVM signature at 0x40000000 FAIL\n"

        .p2align 3
gdt:    .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08: code, 32-bit, flat */
        .quad   0x00cf92000000ffff      /* 0x10: data, flat */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
idt_desc:
        .word   32 * 8 - 1
        .long   idt

        .section .bss
        .p2align 3
idt:    .space  32 * 8
features:       .long   0
faulted:        .long   0
gp_return:      .long   0
failures:       .long   0
boot:           .long   0
        .p2align 4
stack:  .space  4096
stack_top:

        .include "pvh_note.inc"
