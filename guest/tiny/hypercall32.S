/*
 * skiff's hypercall test kernel for the 32-bit register subset (tests/hypercall.rs).
 * 32-bit protected mode, paging off, CPL 0, as the PVH entry leaves it; EFER.LMA clear.
 *
 * Outside 64-bit mode the ABI is KVM's 32-bit one: EAX = number, EBX/ECX/EDX/ESI =
 * arguments, the result in EAX, truncated (-1000 is 0xfffffc18, high half clear).
 * The high halves of RAX..RSI are invisible here, so before every call `garble` goes
 * to long mode for a moment (identity-mapped first GiB, 2 MiB pages), ORs garbage
 * (0xbad0bad1 << 32) into RAX, RBX, RCX, RDX and RSI, and comes back to 32-bit code
 * with paging off: skiff sees the garbage and must use the low halves. After calls
 * with results whose 64-bit value has a set high half (-1000, -7, the time), `peek`
 * goes to long mode at once and saves RAX: its high half must be clear. (Here a
 * 32-bit write to a register clears its high half, so the garbage is set last and
 * the result read first.) Both only where the
 * high halves are observable: this kernel first checks that garbage survives a trip
 * through 32-bit mode ("hc32: high halves observable yes|no").
 *
 * Every call (nop, unknown number, console write, host time, ready; power off last)
 * through each way: the page's 32-bit stub (0xdf020), its 64-bit stub (0xdf000: a
 * 32-bit caller there with garbage high halves makes skiff ask KVM for the mode),
 * a raw site (int3; nopl 0x55(%eax), trapped and emulated), and a raw site with 0x53,
 * patched after its first trap into `call` of the 32-bit patched stub (0xdf030) when
 * the page's address was given, or the 32-bit patched port's `out` inline when not.
 * One line per case, "hc32: WAY CASE ok" or "... FAIL XXXXXXXX"; then
 * "hc32: done failures=N" and power off by the 32-bit stub.
 */
        .set    PAGE, 0xdf000
        .set    STUB64, PAGE
        .set    STUB32, PAGE + 0x20
        .set    PATCHED32, PAGE + 0x30
        .set    HC_NOP, 0x5300
        .set    HC_CONSOLE, 0x5301
        .set    HC_READY, 0x5302
        .set    HC_POWEROFF, 0x5303
        .set    HC_TIME, 0x5305
        .set    HC_PAGE_VA, 0x5308
        .set    GARBAGE, 0xbad0bad1
        .set    CAP_TRAP, 1
        .set    CAP_STUB32, 4

/* The call in EAX..ESI (low halves), then garbage in the high halves. */
.macro SET nr, b=0, c=0, d=0, s=0
        mov     $\nr, %eax
        mov     $\b, %ebx
        mov     $\c, %ecx
        mov     $\d, %edx
        mov     $\s, %esi
        call    garble
.endm
/* EAX == value? One line for NAME (after the way's name). */
.macro CHECK name, value
        mov     $\name, %esi
        mov     $\value, %edi
        call    check
.endm
/* RAX's high half, as `peek` saved it right after the call, clear (where observable;
 * peek first: any 32-bit write to EAX, check's own push and pop included, clears it). */
.macro HIGH name
        mov     $\name, %esi
        call    check_high
.endm

        .include "pvh_entry.inc"
        movl    $s_none, way
        /* Tables for the trips to long mode: PML4[0] -> PDPT[0] -> PD, 512 x 2 MiB. */
        movl    $(pdpt + 3), pml4
        movl    $(pd + 3), pdpt
        xor     %ecx, %ecx
2:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x83, %eax
        mov     %eax, pd(,%ecx,8)
        inc     %ecx
        cmp     $512, %ecx
        jb      2b
        mov     %cr4, %eax
        or      $0x20, %eax             /* PAE */
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx       /* EFER.LME: long mode whenever paging is on */
        rdmsr
        or      $0x100, %eax
        wrmsr

        /* skiff's leaves, and the 32-bit stubs */
        mov     $0x40000100, %eax
        cpuid
        cmp     $0x66696b53, %ebx       /* "Skif" */
        jne     no_skiff
        mov     $0x40000101, %eax
        cpuid
        cmp     $PAGE, %eax
        jne     no_skiff
        mov     %ecx, caps
        mov     %ecx, %eax
        and     $CAP_STUB32, %eax
        CHECK   n_cap32, CAP_STUB32

        /* Does garbage survive in the high halves through 32-bit code? */
        SET     0x11111111, 0x22222222, 0x33333333, 0x44444444, 0x55555555
        call    peek
        xor     %eax, %eax
        mov     $saved + 4, %ebx
        mov     $5, %ecx
1:      cmpl    $GARBAGE, (%ebx)
        setne   %dl
        or      %dl, %al
        add     $8, %ebx
        loop    1b
        mov     $s_obs_yes, %esi
        test    %al, %al
        jnz     2f
        movl    $1, observable
        jmp     3f
2:      mov     $s_obs_no, %esi
3:      call    puts
        /* ... and the low halves are what 32-bit code put there */
        mov     saved, %eax
        CHECK   n_low_halves, 0x11111111

        /* The page's 32-bit stub, then its 64-bit one. */
        movl    $s_stub32, way
        mov     $STUB32, %ebp
        call    cases
        movl    $s_stub64, way
        mov     $STUB64, %ebp
        call    cases

        testl   $CAP_TRAP, caps
        jz      no_trap
        /* A raw site that stays raw: trapped and emulated every time. */
        movl    $s_trap, way
        mov     $site_keep, %ebp
        call    cases
        mov     site_keep, %eax
        CHECK   n_kept, 0x401f0fcc

        /* Patched: the page's address given, so `call` of the 32-bit patched stub. */
        movl    $s_pcall, way
        SET     HC_PAGE_VA, PAGE
        call    *%ebp                   /* through the kept site */
        CHECK   n_va, 0
        mov     $site_call, %ebp
        call    patch_wait
        CHECK   n_patched, 0
        movzbl  site_call, %eax
        CHECK   n_is_call, 0xe8
        mov     site_call + 1, %eax
        add     $site_call + 5, %eax
        CHECK   n_target, PATCHED32
        call    cases

        /* Without the page's address: the 32-bit patched port's `out` inline. */
        movl    $s_pinline, way
        SET     HC_PAGE_VA
        call    STUB32
        mov     $site_inline, %ebp
        call    patch_wait
        CHECK   n_patched, 0
        mov     site_inline, %eax
        CHECK   n_inline, 0x1f0f9ee6    /* e6 9e 0f 1f */
        call    cases
no_trap:
        movl    $s_none, way
        mov     $s_done, %esi
        call    puts
        mov     failures, %eax
        call    puthex
        mov     $'\n', %al
        call    putc
        SET     HC_POWEROFF
        call    STUB32
        mov     $s_alive, %esi          /* not reached: poweroff stops the vCPU */
        call    puts
1:      hlt
        jmp     1b

no_skiff:
        mov     $s_noskiff, %esi
        call    puts
        mov     $0x604, %dx
        mov     $((5 << 10) | (1 << 13)), %ax
        out     %ax, %dx
1:      hlt
        jmp     1b

/* Every call through the way at EBP (called with the call in the registers). */
cases:
        SET     HC_NOP
        call    *%ebp
        CHECK   n_nop, 0
        SET     0x1234
        call    *%ebp
        call    peek
        CHECK   n_unknown, 0xfffffc18
        HIGH    n_unknown_high
        SET     HC_CONSOLE, msg, msg_len
        call    *%ebp
        CHECK   n_console, msg_len
        SET     HC_CONSOLE, msg, 5000
        call    *%ebp
        call    peek
        CHECK   n_e2big, 0xfffffff9
        HIGH    n_e2big_high
        /* Host time: the low 32 bits of the nanoseconds; two calls apart by more
         * than nothing and less than a second (an unknown number would give -1000
         * twice). */
        SET     HC_TIME
        call    *%ebp
        call    peek
        mov     %eax, t1
        HIGH    n_time_high
        SET     HC_TIME
        call    *%ebp
        sub     t1, %eax
        jz      1f
        cmp     $1000000000, %eax
        jae     1f
        xor     %eax, %eax
1:      CHECK   n_time, 0
        SET     HC_READY
        call    *%ebp
        CHECK   n_ready, 0
        ret

/* The raw sites, each a function: the call in the registers. */
site_keep:
        .byte   0xcc, 0x0f, 0x1f, 0x40, 0x55
        ret
site_call:
        .byte   0xcc, 0x0f, 0x1f, 0x40, 0x53
        ret
site_inline:
        .byte   0xcc, 0x0f, 0x1f, 0x40, 0x53
        ret

/* Calls the site at EBP with HC_NOP until it is no longer raw (skiff patches it from
 * its event loop, a moment after a trap); EAX = 0 when it was patched. */
patch_wait:
        mov     $100000, %ecx
1:      cmpb    $0xcc, (%ebp)
        jne     2f
        push    %ecx
        SET     HC_NOP
        call    *%ebp
        pop     %ecx
        loop    1b
        mov     $1, %eax
        ret
2:      xor     %eax, %eax
        ret

/* ORs GARBAGE << 32 into RAX, RBX, RCX, RDX, RSI in long mode; back with paging off.
 * EDI is lost; no stack in 64-bit code. */
garble:
        mov     %cr0, %edi
        or      $0x80000000, %edi
        mov     %edi, %cr0              /* LMA: compatibility mode */
        ljmp    $0x18, $1f
        .code64
1:      mov     $GARBAGE, %edi
        shl     $32, %rdi
        or      %rdi, %rax
        or      %rdi, %rbx
        or      %rdi, %rcx
        or      %rdi, %rdx
        or      %rdi, %rsi
        ljmpl   *back32(%rip)
        .code32
to32:   mov     %cr0, %edi
        and     $0x7fffffff, %edi
        mov     %edi, %cr0              /* paging off: LMA clear, legacy 32-bit mode */
        ret

/* Stores RAX, RBX, RCX, RDX, RSI (all 64 bits) at `saved`, from long mode. EDI lost. */
peek:
        mov     %cr0, %edi
        or      $0x80000000, %edi
        mov     %edi, %cr0
        ljmp    $0x18, $1f
        .code64
1:      mov     %rax, saved(%rip)
        mov     %rbx, saved + 8(%rip)
        mov     %rcx, saved + 16(%rip)
        mov     %rdx, saved + 24(%rip)
        mov     %rsi, saved + 32(%rip)
        ljmpl   *back32(%rip)
        .code32

/* ESI = the case's name: RAX's high half, as `peek` saved it, must be clear (when
 * observable). */
check_high:
        cmpl    $0, observable
        je      1f
        mov     saved + 4, %eax
        xor     %edi, %edi
        jmp     check
1:      ret

/* EAX = the result, EDI = the expected value, ESI = the case's name. EBP kept. */
check:
        push    %eax
        push    %esi
        mov     $s_hc, %esi
        call    puts
        mov     way, %esi
        call    puts
        pop     %esi
        call    puts
        pop     %eax
        cmp     %edi, %eax
        jne     1f
        mov     $s_ok, %esi
        jmp     puts
1:      incl    failures
        mov     $s_fail, %esi
        call    puts
        call    puthex
        mov     $'\n', %al
        jmp     putc

        .include "console.inc"

        .section .data
        .p2align 3
back32: .long   to32
        .word   0x08
gdt:    .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08: code, 32-bit, flat */
        .quad   0x00cf92000000ffff      /* 0x10: data, flat */
        .quad   0x00af9a000000ffff      /* 0x18: code, 64-bit */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt

s_hc:           .asciz  "hc32: "
s_none:         .asciz  ""
s_stub32:       .asciz  "stub32 "
s_stub64:       .asciz  "stub64 "
s_trap:         .asciz  "trap "
s_pcall:        .asciz  "patched-call "
s_pinline:      .asciz  "patched-inline "
s_ok:           .asciz  " ok\n"
s_fail:         .asciz  " FAIL "
s_obs_yes:      .asciz  "hc32: high halves observable yes\n"
s_obs_no:       .asciz  "hc32: high halves observable no\n"
s_done:         .asciz  "hc32: done failures="
s_alive:        .asciz  "hc32: still running after power off FAIL\n"
s_noskiff:      .asciz  "hc32: no skiff leaves FAIL\n"
n_cap32:        .asciz  "cpuid 32-bit stubs"
n_low_halves:   .asciz  "low halves kept"
n_nop:          .asciz  "nop"
n_unknown:      .asciz  "unknown"
n_unknown_high: .asciz  "unknown high half clear"
n_console:      .asciz  "console"
n_e2big:        .asciz  "console e2big"
n_e2big_high:   .asciz  "console e2big high half clear"
n_time:         .asciz  "time"
n_time_high:    .asciz  "time high half clear"
n_ready:        .asciz  "ready"
n_kept:         .asciz  "site kept raw"
n_va:           .asciz  "page address"
n_patched:      .asciz  "site patched"
n_is_call:      .asciz  "site is a call"
n_target:       .asciz  "call target"
n_inline:       .asciz  "site is the out inline"
msg:            .ascii  "hc32-console: written in 32-bit mode\n"
        .set    msg_len, . - msg

        .section .bss
        .p2align 12
pml4:   .space  4096
pdpt:   .space  4096
pd:     .space  4096
        .p2align 3
saved:  .space  40
caps:   .long   0
way:    .long   0
t1:     .long   0
observable:     .long   0
failures:       .long   0
        .p2align 4
stack:  .space  4096
stack_top:

        .include "pvh_note.inc"
