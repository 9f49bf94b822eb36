/*
 * skiff's multiboot information test kernel: a flat binary (no ELF), loaded through
 * the header's address fields (flag 16, the "a.out kludge"). It reads the boot
 * information structure EBX points at and prints, one line each:
 *   mb-info: flags=XXXXXXXX mem_lower=N mem_upper=N info=XXXXXXXX
 *   mb-info: cmdline=<the command line>
 *   mb-info: loader=<the boot loader's name>
 *   mb-info: mmap XXXXXXXXXXXXXXXX XXXXXXXXXXXXXXXX type N     (base, length; each entry)
 *   mb-info: module I start=XXXXXXXX end=XXXXXXXX sum=XXXXXXXX string=<string>
 * (sum: the 32-bit sum of the module's bytes). It checks what a kernel relies on:
 * the magic, the flags for each of those fields, modules page-aligned and after the
 * kernel's BSS, the structure above 64 KiB and clear of the kernel; and ends with
 * "mb-info: checks passed" and exit value 0x11 through port 0xf4, or "mb-info:
 * FAILED: ..." and 0x22.
 */
        .set    MB_MAGIC, 0x1badb002
        .set    MB_FLAGS, 0x00010003    /* page-aligned modules, memory info, addresses */
        .set    MAX_MMAP, 32
        .set    MAX_MODS, 16

        .code32
        .section .text
        .globl _start
image_start:
        jmp     _start
        .p2align 2
mb_header:
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)
        .long   mb_header               /* header_addr */
        .long   image_start             /* load_addr */
        .long   image_end               /* load_end_addr */
        .long   bss_end                 /* bss_end_addr */
        .long   _start                  /* entry_addr */

_start:
        cli
        cld
        mov     $stack_top, %esp
        mov     $msg_magic, %esi
        cmp     $0x2badb002, %eax
        jne     fail
        mov     %ebx, %ebp              /* EBP = the information structure */
        mov     $msg_where, %esi
        cmp     $0x10000, %ebp
        jb      fail
        cmp     $image_start, %ebp
        jae     fail_if_inside
        jmp     1f
fail_if_inside:
        cmp     $bss_end, %ebp
        jb      fail
1:      mov     $msg_flags, %esi
        call    puts
        mov     (%ebp), %eax
        call    puthex
        mov     $msg_lower, %esi
        call    puts
        mov     4(%ebp), %eax
        call    putdec
        mov     $msg_upper, %esi
        call    puts
        mov     8(%ebp), %eax
        call    putdec
        mov     $msg_info, %esi
        call    puts
        mov     %ebp, %eax
        call    puthex
        call    newline
        /* each field's flag: memory (0), cmdline (2), mods (3), mmap (6), loader (9) */
        mov     $msg_noflag, %esi
        mov     (%ebp), %eax
        and     $0x24d, %eax
        cmp     $0x24d, %eax
        jne     fail

        mov     $msg_cmdline, %esi
        call    puts
        mov     16(%ebp), %esi
        call    puts
        call    newline
        mov     $msg_loader, %esi
        call    puts
        mov     64(%ebp), %esi
        call    puts
        call    newline

        /* memory map: entries of size (4), base (8), length (8), type (4) */
        mov     48(%ebp), %ebx          /* mmap_addr */
        mov     44(%ebp), %edi
        add     %ebx, %edi              /* end */
        mov     $MAX_MMAP, %ecx
2:      cmp     %edi, %ebx
        jae     3f
        mov     $msg_mmap, %esi
        call    puts
        mov     8(%ebx), %eax
        call    puthex
        mov     4(%ebx), %eax
        call    puthex
        mov     $' ', %al
        call    putc
        mov     16(%ebx), %eax
        call    puthex
        mov     12(%ebx), %eax
        call    puthex
        mov     $msg_type, %esi
        call    puts
        mov     20(%ebx), %eax
        call    putdec
        call    newline
        add     (%ebx), %ebx
        add     $4, %ebx
        loop    2b

3:      /* modules: mod_start, mod_end, string, reserved */
        mov     24(%ebp), %ebx          /* mods_addr */
        mov     20(%ebp), %ecx          /* mods_count */
        mov     $msg_toomany, %esi
        cmp     $MAX_MODS, %ecx
        ja      fail
        xor     %edx, %edx              /* module index */
4:      test    %ecx, %ecx
        jz      done
        mov     $msg_module, %esi
        call    puts
        mov     %edx, %eax
        call    putdec
        mov     $msg_start, %esi
        call    puts
        mov     (%ebx), %eax
        call    puthex
        mov     $msg_end, %esi
        call    puts
        mov     4(%ebx), %eax
        call    puthex
        mov     $msg_sum, %esi
        call    puts
        call    module_sum
        call    puthex
        mov     $msg_string, %esi
        call    puts
        mov     8(%ebx), %esi
        call    puts
        call    newline
        mov     $msg_unaligned, %esi
        testl   $0xfff, (%ebx)
        jnz     fail
        mov     $msg_overlap, %esi
        cmpl    $bss_end, (%ebx)
        jb      fail
        add     $16, %ebx
        inc     %edx
        dec     %ecx
        jmp     4b

done:   mov     $msg_passed, %esi
        call    puts
        mov     $0x11, %al
        out     %al, $0xf4
        jmp     halt

fail:   push    %esi
        mov     $msg_failed, %esi
        call    puts
        pop     %esi
        call    puts
        call    newline
        mov     $0x22, %al
        out     %al, $0xf4
halt:   hlt
        jmp     halt

/* EAX = the 32-bit sum of the bytes of the module at EBX (start, end) */
module_sum:
        push    %esi
        push    %ecx
        xor     %eax, %eax
        mov     (%ebx), %esi
        mov     4(%ebx), %ecx
        sub     %esi, %ecx
        jbe     2f
        push    %edx
1:      movzbl  (%esi), %edx
        add     %edx, %eax
        inc     %esi
        loop    1b
        pop     %edx
2:      pop     %ecx
        pop     %esi
        ret

newline:
        push    %eax
        mov     $'\n', %al
        call    putc
        pop     %eax
        ret

        .include "console.inc"

msg_magic:     .asciz "EAX is not the multiboot magic 0x2badb002"
msg_where:     .asciz "the information structure is below 64 KiB or inside the kernel"
msg_noflag:    .asciz "a flag is missing (memory, cmdline, mods, mmap, loader name)"
msg_toomany:   .asciz "more than 16 modules"
msg_unaligned: .asciz "a module is not page-aligned"
msg_overlap:   .asciz "a module overlaps the kernel"
msg_failed:    .asciz "mb-info: FAILED: "
msg_passed:    .asciz "mb-info: checks passed\n"
msg_flags:     .asciz "mb-info: flags="
msg_lower:     .asciz " mem_lower="
msg_upper:     .asciz " mem_upper="
msg_info:      .asciz " info="
msg_cmdline:   .asciz "mb-info: cmdline="
msg_loader:    .asciz "mb-info: loader="
msg_mmap:      .asciz "mb-info: mmap "
msg_type:      .asciz " type "
msg_module:    .asciz "mb-info: module "
msg_start:     .asciz " start="
msg_end:       .asciz " end="
msg_sum:       .asciz " sum="
msg_string:    .asciz " string="
        .p2align 2
image_end:

        .section .bss
        .p2align 4
stack:  .skip   4096
stack_top:
bss_end:
