/*
 * skiff's TPR benchmark kernel (bench/tpr.py): the six TPR access forms timed in the
 * guest with the TSC, under `--tpr-patch=off` (every access an MMIO access) or `on`
 * (each site rewritten into a call of skiff's helper). 32-bit protected mode at CPL 0
 * (where 32-bit kernels touch the TPR), paging off, interrupts off, one vCPU.
 *
 * First the TSC against skiff's clock (HC_TIME around a spin):
 *   tprbench: cal ticks=HEX ns=HEX
 * Then per form: its loop runs until each of its sites is rewritten (at most WARM
 * iterations: with patching off, or a report that never lands, it stays MMIO), then
 * REPS times, interleaved with its baseline (the same loop without the access; for
 * push [TPR], `push eax` instead), N iterations each; the lowest of each counts:
 *   tprbench: form=NAME patched=0|1 accesses=HEX ticks=HEX base=HEX
 * ticks and base are 64-bit. The register forms' writes alternate between two
 * classes (0x20, 0x30), as a kernel raising and lowering its priority does; mov
 * [TPR],imm32 writes one value (0x30) every time: two sites in one loop would not
 * both get patched where reports arrive late (the second one's report lands on the
 * first one's exit). "tprbench: done", then power off.
 */
        .set    TPR, 0xfee00080
        .set    SVR, 0xfee000f0
        .set    HC_PAGE, 0xdf000
        .set    HC_POWEROFF, 0x5303
        .set    HC_TIME, 0x5305
        .set    N, 2000
        .set    WARM, 30000
        .set    WARM_CHUNK, 200
        .set    REPS, 3

        .include "pvh_entry.inc"
        movl    $0x1ff, SVR             /* software-enable the APIC */
        call    calibrate
        mov     $forms, %ebp
1:      cmpl    $0, (%ebp)
        je      2f
        call    bench_form
        add     $FORM_SIZE, %ebp
        jmp     1b
2:      mov     $s_done, %esi
        call    puts
        mov     $HC_POWEROFF, %eax
        call    HC_PAGE
3:      hlt
        jmp     3b

/* "tprbench: cal ticks=HEX ns=HEX": TSC ticks and skiff's nanoseconds (both
   32-bit differences: the spin takes milliseconds) around a spin. */
calibrate:
        mov     $HC_TIME, %eax
        call    HC_PAGE
        mov     %eax, %edi
        rdtsc
        mov     %eax, %ebx
        mov     $20000, %ecx
1:      dec     %ecx
        jnz     1b
        rdtsc
        sub     %ebx, %eax
        mov     %eax, %ebx
        mov     $HC_TIME, %eax
        call    HC_PAGE
        sub     %edi, %eax
        mov     %eax, %edi
        mov     $s_cal, %esi
        call    puts
        mov     %ebx, %eax
        call    puthex
        mov     $s_ns, %esi
        call    puts
        mov     %edi, %eax
        call    puthex
        mov     $10, %al
        call    putc
        ret

/* One form: the table entry at EBP (see `forms`). */
bench_form:
        /* Warm up until its sites are rewritten (their first bytes change), in
           chunks: a late report refused as stale unless the vCPU is still just
           past the site lands best in the tight loop itself. */
        mov     $(WARM / WARM_CHUNK), %esi
1:      call    sites_patched
        jnc     2f
        mov     $WARM_CHUNK, %ecx
        call    *F_LOOP(%ebp)
        dec     %esi
        jnz     1b
2:      mov     $0xffffffff, %eax       /* the lowest of each, 64-bit */
        mov     %eax, best_loop
        mov     %eax, best_loop + 4
        mov     %eax, best_base
        mov     %eax, best_base + 4
        mov     $REPS, %esi
3:      mov     F_LOOP(%ebp), %ebx
        mov     $best_loop, %edi
        call    time_it
        mov     F_BASE(%ebp), %ebx
        mov     $best_base, %edi
        call    time_it
        dec     %esi
        jnz     3b
        /* The line. */
        mov     $s_form, %esi
        call    puts
        mov     F_NAME(%ebp), %esi
        call    puts
        mov     $s_patched, %esi
        call    puts
        call    sites_patched
        mov     $'1', %al
        jnc     4f
        mov     $'0', %al
4:      call    putc
        mov     $s_accesses, %esi
        call    puts
        mov     F_PER(%ebp), %eax
        imul    $N, %eax
        call    puthex
        mov     $s_ticks, %esi
        call    puts
        mov     $best_loop, %ebx
        call    puthex64
        mov     $s_base, %esi
        call    puts
        mov     $best_base, %ebx
        call    puthex64
        mov     $10, %al
        call    putc
        ret

/* CF clear when every site of the form at EBP has been rewritten. */
sites_patched:
        mov     F_SITE1(%ebp), %ebx
        mov     F_OP(%ebp), %dl
        cmp     (%ebx), %dl
        je      1f
        mov     F_SITE2(%ebp), %ebx
        test    %ebx, %ebx
        jz      2f
        cmp     (%ebx), %dl
        je      1f
2:      clc
        ret
1:      stc
        ret

/* Runs the loop at EBX for N iterations and keeps the lower of its ticks and the
   64-bit value at EDI. Preserves EBP, ESI. */
time_it:
        push    %esi
        push    %ebp
        push    %edi
        rdtsc
        mov     %eax, %esi
        mov     %edx, %ebp
        mov     $N, %ecx
        call    *%ebx
        rdtsc
        sub     %esi, %eax
        sbb     %ebp, %edx
        pop     %edi
        cmp     4(%edi), %edx           /* keep the lower (unsigned, 64-bit) */
        ja      2f
        jb      1f
        cmp     (%edi), %eax
        jae     2f
1:      mov     %eax, (%edi)
        mov     %edx, 4(%edi)
2:      pop     %ebp
        pop     %esi
        ret

/* The 64-bit value at EBX as 16 hex digits. */
puthex64:
        mov     4(%ebx), %eax
        call    puthex
        mov     (%ebx), %eax
        call    puthex
        ret

/* The loops: ECX iterations each; clobber EAX, ECX, EDX. */
loop_store_reg:
        mov     $0x20, %edx
1:      xor     $0x10, %edx
site_store_reg:
        mov     %edx, TPR               /* 89 15 */
        dec     %ecx
        jnz     1b
        ret
base_store_reg:
        mov     $0x20, %edx
1:      xor     $0x10, %edx
        dec     %ecx
        jnz     1b
        ret
loop_load_reg:
site_load_reg:
        mov     TPR, %edx               /* 8b 15 */
        dec     %ecx
        jnz     loop_load_reg
        ret
base_empty:
        dec     %ecx
        jnz     base_empty
        ret
loop_load_eax:
site_load_eax:
        mov     TPR, %eax               /* a1 */
        dec     %ecx
        jnz     loop_load_eax
        ret
loop_store_eax:
        mov     $0x20, %eax
1:      xor     $0x10, %eax
site_store_eax:
        mov     %eax, TPR               /* a3 */
        dec     %ecx
        jnz     1b
        ret
base_store_eax:
        mov     $0x20, %eax
1:      xor     $0x10, %eax
        dec     %ecx
        jnz     1b
        ret
loop_store_imm:
site_store_imm:
        movl    $0x30, TPR              /* c7 05 */
        dec     %ecx
        jnz     loop_store_imm
        ret
loop_push:
site_push:
        pushl   TPR                     /* ff 35 */
        add     $4, %esp
        dec     %ecx
        jnz     loop_push
        ret
base_push:
        push    %eax
        add     $4, %esp
        dec     %ecx
        jnz     base_push
        ret

        .include "console.inc"

        .include "flat_gdt.inc"

/* Per form: name, loop, baseline, accesses per iteration, its sites (the second
   0 when there is one) and their original first byte. */
        .set    F_NAME, 0
        .set    F_LOOP, 4
        .set    F_BASE, 8
        .set    F_PER, 12
        .set    F_SITE1, 16
        .set    F_SITE2, 20
        .set    F_OP, 24
        .set    FORM_SIZE, 28
        .macro  FORM name, loop, base, per, site1, site2, op
        .long   \name, \loop, \base, \per, \site1, \site2, \op
        .endm
        .p2align 2
forms:
        FORM    n_store_reg, loop_store_reg, base_store_reg, 1, site_store_reg, 0, 0x89
        FORM    n_load_reg, loop_load_reg, base_empty, 1, site_load_reg, 0, 0x8b
        FORM    n_load_eax, loop_load_eax, base_empty, 1, site_load_eax, 0, 0xa1
        FORM    n_store_eax, loop_store_eax, base_store_eax, 1, site_store_eax, 0, 0xa3
        FORM    n_store_imm, loop_store_imm, base_empty, 1, site_store_imm, 0, 0xc7
        FORM    n_push, loop_push, base_push, 1, site_push, 0, 0xff
        .long   0

best_loop: .quad 0
best_base: .quad 0
s_cal:          .asciz "tprbench: cal ticks="
s_ns:           .asciz " ns="
s_form:         .asciz "tprbench: form="
s_patched:      .asciz " patched="
s_accesses:     .asciz " accesses="
s_ticks:        .asciz " ticks="
s_base:         .asciz " base="
s_done:         .asciz "tprbench: done\n"
/* The names bench/tpr.py prints (as src/tpr/decode.rs's FORM_NAMES, no spaces). */
n_store_reg:    .asciz "mov[tpr],r32"
n_load_reg:     .asciz "movr32,[tpr]"
n_load_eax:     .asciz "moveax,[tpr]"
n_store_eax:    .asciz "mov[tpr],eax"
n_store_imm:    .asciz "mov[tpr],imm32"
n_push:         .asciz "push[tpr]"

        .section .bss
        .p2align 12
        .skip   4096
stack_top:

        .include "pvh_note.inc"
