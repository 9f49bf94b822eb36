/*
 * skiff's multiboot SMP test kernel (ELF32). The bootstrap processor reads the CPU
 * count from fw_cfg (key 0x0005, ports 0x510/0x511), copies a real-mode trampoline
 * to 0x8000, enables its local APIC and sends INIT, then SIPI twice (vector 0x08) to
 * all processors but itself, as on hardware. Each application processor wakes in
 * real mode at 0x8000, counts itself (lock inc at 0x7000) and halts. The BSP waits
 * (bounded) for the count to reach the CPU count less one and prints
 *   "mb-smp: N of M application processors started"
 * then ends the machine through the exit device (port 0xf4) with the value N.
 */
        .set    TRAMPOLINE, 0x8000
        .set    COUNTER, 0x7000
        .set    APIC, 0xfee00000
        .set    WAIT_LOOPS, 3000000

        .include "fwcfg_cpus.inc"
        .include "multiboot.inc"
        cmp     $0x2badb002, %eax
        jne     bad_magic

        fwcfg_cpus                      /* EBX = CPUs */
        lea     -1(%ebx), %edi          /* EDI = APs expected */

        movl    $0, COUNTER
        mov     $trampoline, %esi
        mov     $TRAMPOLINE, %edi
        mov     $(trampoline_end - trampoline), %ecx
        rep movsb
        lea     -1(%ebx), %edi

        /* software-enable the local APIC (SVR bit 8, spurious vector 0xff) */
        movl    $0x1ff, APIC + 0xf0
        /* INIT to all excluding self (level assert), then SIPI twice */
        movl    $0, APIC + 0x310
        movl    $0x000c4500, APIC + 0x300
        call    icr_wait
        movl    $0x000c4600 | (TRAMPOLINE >> 12), APIC + 0x300
        call    icr_wait
        movl    $0x000c4600 | (TRAMPOLINE >> 12), APIC + 0x300
        call    icr_wait

        /* wait until every AP counted itself (bounded) */
        mov     $WAIT_LOOPS, %ecx
1:      cmp     COUNTER, %edi
        je      2f
        pause
        loop    1b
2:      mov     $msg_smp, %esi
        call    puts
        mov     COUNTER, %eax
        call    putdec
        mov     $msg_of, %esi
        call    puts
        mov     %edi, %eax
        call    putdec
        mov     $msg_started, %esi
        call    puts
        mov     COUNTER, %eax
        out     %al, $0xf4
        jmp     halt

bad_magic:
        mov     $msg_magic, %esi
        call    puts
        mov     $0x7f, %al
        out     %al, $0xf4
halt:   hlt
        jmp     halt

/* waits (bounded) for the ICR's delivery status bit to clear */
icr_wait:
        push    %ecx
        mov     $100000, %ecx
1:      testl   $0x1000, APIC + 0x300
        jz      2f
        pause
        loop    1b
2:      pop     %ecx
        ret

        .include "console.inc"

/* The application processors' real-mode start, copied to TRAMPOLINE. */
        .code16
trampoline:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        lock incl COUNTER
1:      hlt
        jmp     1b
trampoline_end:
        .code32

        .section .rodata
msg_magic:   .asciz "mb-smp: FAILED: EAX is not the multiboot magic\n"
msg_smp:     .asciz "mb-smp: "
msg_of:      .asciz " of "
msg_started: .asciz " application processors started\n"

        .section .bss
        .p2align 4
stack:  .skip   4096
stack_top:
