/*
 * skiff's fw_cfg test kernel (multiboot, ELF32): reads QEMU's firmware configuration
 * interface through its ports (selector 0x510, data 0x511) and prints
 *   fw_cfg: signature=QEMU id=XXXXXXXX cpus=N ram=XXXXXXXXXXXXXXXX
 *   fw_cfg: files=N
 *   fw_cfg: file <name> size=N select=XXXX        (each directory entry)
 *   fw_cfg: data <name>=<the file's first 240 bytes>
 * then ends through the exit device (port 0xf4) with 0x11, or 0x22 if the signature
 * is not "QEMU".
 */
        .set    MAX_FILES, 16
        .set    MAX_DATA, 240

        .include "multiboot.inc"
        mov     $msg_sig, %esi
        call    puts
        mov     $0x0000, %ax
        call    select
        call    read32
        mov     %eax, signature
        mov     $signature, %esi
        call    puts
        mov     $msg_id, %esi
        call    puts
        mov     $0x0001, %ax
        call    select
        call    read32
        call    puthex
        mov     $msg_cpus, %esi
        call    puts
        mov     $0x0005, %ax
        call    select
        call    read8
        push    %eax
        call    read8
        shl     $8, %eax
        pop     %edx
        or      %edx, %eax
        call    putdec
        mov     $msg_ram, %esi
        call    puts
        mov     $0x0003, %ax
        call    select
        call    read32
        mov     %eax, %edx
        call    read32
        call    puthex
        mov     %edx, %eax
        call    puthex
        call    newline

        /* the directory: be32 count, then 64-byte entries, kept in `dir` */
        mov     $0x0019, %ax
        call    select
        call    read32
        bswap   %eax
        mov     %eax, %ebx
        mov     $msg_files, %esi
        call    puts
        call    putdec
        call    newline
        cmp     $MAX_FILES, %ebx
        jbe     1f
        mov     $MAX_FILES, %ebx
1:      mov     %ebx, nfiles
        mov     $dir, %edi
        mov     %ebx, %ecx
        shl     $6, %ecx
        jz      3f
2:      call    read8
        stosb
        loop    2b

3:      xor     %ebx, %ebx              /* entry index */
4:      cmp     nfiles, %ebx
        jae     8f
        mov     %ebx, %edi
        shl     $6, %edi
        add     $dir, %edi              /* EDI = entry */
        mov     $msg_file, %esi
        call    puts
        lea     8(%edi), %esi
        call    puts
        mov     $msg_size, %esi
        call    puts
        mov     (%edi), %eax
        bswap   %eax
        call    putdec
        mov     $msg_select, %esi
        call    puts
        movzwl  4(%edi), %eax
        xchg    %al, %ah
        push    %eax
        call    puthex
        call    newline
        /* the data */
        mov     $msg_data, %esi
        call    puts
        lea     8(%edi), %esi
        call    puts
        mov     $'=', %al
        call    putc
        pop     %eax
        call    select
        mov     (%edi), %ecx
        bswap   %ecx
        cmp     $MAX_DATA, %ecx
        jbe     5f
        mov     $MAX_DATA, %ecx
5:      test    %ecx, %ecx
        jz      7f
6:      call    read8
        call    putc
        loop    6b
7:      call    newline
        inc     %ebx
        jmp     4b

8:      mov     $0x11, %al
        cmpl    $0x554d4551, signature  /* "QEMU" */
        je      9f
        mov     $0x22, %al
9:      out     %al, $0xf4
halt:   hlt
        jmp     halt

/* select: AX to the selector port */
select:
        push    %edx
        mov     $0x510, %dx
        out     %ax, %dx
        pop     %edx
        ret

/* read8: EAX = the next data byte */
read8:
        push    %edx
        mov     $0x511, %dx
        xor     %eax, %eax
        in      %dx, %al
        pop     %edx
        ret

/* read32: EAX = the next four data bytes, little-endian */
read32:
        push    %ecx
        push    %edx
        xor     %edx, %edx
        mov     $4, %ecx
1:      call    read8
        shl     $24, %eax
        shr     $8, %edx
        or      %eax, %edx
        loop    1b
        mov     %edx, %eax
        pop     %edx
        pop     %ecx
        ret

newline:
        push    %eax
        mov     $'\n', %al
        call    putc
        pop     %eax
        ret

        .include "console.inc"

        .section .rodata
msg_sig:    .asciz "fw_cfg: signature="
msg_id:     .asciz " id="
msg_cpus:   .asciz " cpus="
msg_ram:    .asciz " ram="
msg_files:  .asciz "fw_cfg: files="
msg_file:   .asciz "fw_cfg: file "
msg_size:   .asciz " size="
msg_select: .asciz " select="
msg_data:   .asciz "fw_cfg: data "

        .section .bss
        .p2align 4
signature: .skip 8                      /* four bytes and a NUL */
nfiles: .skip   4
dir:    .skip   64 * MAX_FILES + 1
stack:  .skip   4096
stack_top:
