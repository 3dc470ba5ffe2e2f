/* The kernel profile tables of the GPU tracer (tests/gpu/kprof_table.c,
 * compiled in here: the tracer itself needs CUPTI and a GPU): names made
 * readable, categories, records assigned to sections by their start,
 * per-call figures, the whole run without sections. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tap.h"
#include "tests/gpu/kprof_table.c"

static int readable_is(const char *mangled, const char *want)
{
    char out[160];
    kp_readable(mangled, out, sizeof out);
    return tap_ok(!strcmp(out, want), "readable %s -> %s (got %s)", mangled, want, out);
}

/* the report into a string */
static char *report(const kp_prof *p, const char *whole, int top)
{
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    kp_report(p, f, whole, top);
    fclose(f);
    return buf;
}

int main(void)
{
    readable_is("_Z12round_kernelIfEvPT_PKfm", "round_kernel<...>");
    readable_is("_ZN12_GLOBAL__N_112round_kernelEPfPKfm", "round_kernel");
    readable_is("_ZN5cudnn3ops16nchwToNhwcKernelIfEEvv", "cudnn::ops::nchwToNhwcKernel<...>");
    readable_is("_ZL19attention_tc_kernelILi40EEvPKv", "attention_tc_kernel<...>");
    readable_is("_ZN7cutlass6KernelI28ImplicitGemmConvolutionFpropEEvNT_6ParamsE",
                "cutlass::Kernel<ImplicitGemmConvolutionFprop, Params>");
    readable_is("_ZNSt6vectorIiEE", "std::vector<...>");
    readable_is("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc",
                "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc");
    readable_is("_Z", "_Z");
    readable_is("_Z999abc", "_Z999abc"); /* a length past the end: left as it is */
    char small[8];
    kp_readable("_Z12round_kernelv", small, sizeof small);
    tap_ok(!strcmp(small, "round_k"), "readable: cut to the buffer (%s)", small);

    const struct {
        const char *name, *cat;
    } cats[] = {
        {"round_kernel<...>", "ours: 16-bit conversions"},
        {"from16_nchw_kernel<__nv_bfloat16>", "ours: 16-bit conversions"}, /* as the second H200 run named it */
        {"to16_kernel<__nv_bfloat16>", "ours: 16-bit conversions"},
        {"from16_kernel<__half>", "ours: 16-bit conversions"},
        {"attention_tc_kernel<...>", "ours: attention"},
        {"attn_tc_dq_kernel", "ours: attention"},
        /* as the H200 run named them: an anonymous namespace's kernels */
        {"_GLOBAL__N__78febc66_15_attention_tc_cu_6b56aff6::attention_tc_kernel<__nv_bfloat16, EEE, _S5_i>",
         "ours: attention"},
        {"_GLOBAL__N__a20fe499_24_attention_tc_backward_cu_020d35ed::attn_tc_dkv_kernel<__nv_bfloat16, EEE>",
         "ours: attention"},
        {"ns::some_other_thing<a::round_kernel>", "other"},
        {"groupnorm_forward_kernel", "ours: norms"},
        {"adamw8bit_many_kernel", "ours: optimizer and clipping"},
        {"linear_epilogue_kernel", "ours: bias and epilogues"},
        {"binary_kernel", "ours: elementwise and layout"},
        {"cudnn::ops::nchwToNhwcKernel<...>", "library layout transposes"},
        {"sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "cuDNN convolution"},
        {"implicit_convolve_sgemm<...>", "cuDNN convolution"},
        {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "cuBLAS GEMM"},
        {"nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "cuBLAS GEMM"},
        {"[memcpy HtoD]", "copies and memsets"},
        {"some_other_thing", "other"},
    };
    for (size_t i = 0; i < sizeof cats / sizeof cats[0]; i++)
        tap_ok(!strcmp(kp_category(cats[i].name), cats[i].cat), "category %s: %s (got %s)", cats[i].name,
               cats[i].cat, kp_category(cats[i].name));

    /* records: two sections; the first of 2 calls */
    kp_prof p = {0};
    kp_add(&p, "setup_kernel", 0, 50);                           /* before any section: in none */
    kp_begin(&p, "fwd bf16", 100);
    for (int call = 0; call < 2; call++) {
        const uint64_t t = 100 + 1000 * (uint64_t)call;
        kp_add(&p, "_Z12round_kernelIfEvPT_PKfm", t + 10, t + 110);  /* 100 ns */
        kp_add(&p, "_Z12round_kernelIfEvPT_PKfm", t + 200, t + 300); /* 100 ns */
        kp_add(&p, "sm90_xmma_gemm_bf16bf16_bf16f32", t + 400, t + 1000); /* 600 ns */
        kp_config(&p, "sm90_xmma_gemm_bf16bf16_bf16f32", 64 + call, 16, 1, 128, 1, 1, 168, 1024 * 73 + 5);
    }
    kp_end(&p, 2100, 2);
    kp_begin(&p, "train | bf16", 3000);
    kp_add(&p, "[memset]", 3000, 3050);
    kp_add(&p, "attn_tc_dq_kernel", 3100, 3500);
    /* a record that arrived after the section ended but started inside it */
    kp_add(&p, "attn_tc_dq_kernel", 3600, 3700);
    kp_end(&p, 4000, 1);
    kp_add(&p, "after_kernel", 5000, 6000);
    tap_ok(p.nn == 6 && p.nr == 11 && p.ns == 2, "interned 6 names, 11 records, 2 sections (%zu, %zu, %zu)", p.nn,
           p.nr, p.ns);
    char *r = report(&p, NULL, 20);
    for (char *l = r, *e; l && *l; l = e ? e + 1 : NULL) { /* as TAP comments */
        e = strchr(l, '\n');
        tap_diag("%.*s", (int)(e ? e - l : (long)strlen(l)), l);
    }
    tap_ok(strstr(r, "### kernel profile: fwd bf16\n") && strstr(r, "### kernel profile: train / bf16\n") == NULL &&
               strstr(r, "### kernel profile: train | bf16\n"),
           "a heading per section (labels as given)");
    /* fwd: per call 1.0 us wall (2000 ns / 2), 0.8 us of kernels, 3 launches */
    tap_ok(strstr(r, "2 calls; per call: 0.001 ms wall, 0.001 ms of GPU work (80% of the wall") != NULL,
           "fwd: per-call wall and busy share (80%%)");
    tap_ok(strstr(r, "| cuBLAS GEMM | 0.001 | 75.0% | 1.0 |") != NULL, "fwd: the GEMM category, 75%% of 800 ns");
    tap_ok(strstr(r, "| ours: 16-bit conversions | 0.000 | 25.0% | 2.0 |") != NULL,
           "fwd: the conversions, 25%%, 2 launches per call");
    tap_ok(strstr(r, "| round_kernel<...> | ours: 16-bit conversions | 0.000 | 25.0% | 2.0 | 0.1 |") != NULL,
           "fwd: the kernel row, 0.1 us each");
    tap_ok(strstr(r, "| sm90_xmma_gemm_bf16bf16_bf16f32 | cuBLAS GEMM | 0.001 | 75.0% | 1.0 | 0.6 | "
                     "64x16x1 x 128, 168 regs, 74 KB smem |") != NULL,
           "fwd: the GEMM row with its first launch's grid, block, registers and shared memory");
    tap_ok(strstr(r, "| round_kernel<...> | ours: 16-bit conversions | 0.000 | 25.0% | 2.0 | 0.1 |  |") != NULL,
           "fwd: no configuration recorded, an empty cell");
    tap_ok(strstr(r, "setup_kernel") == NULL && strstr(r, "after_kernel") == NULL,
           "records outside the sections are in none");
    tap_ok(strstr(r, "| ours: attention | 0.001 | 90.9% | 2.0 |") != NULL &&
               strstr(r, "| copies and memsets | 0.000 | 9.1% | 1.0 |") != NULL,
           "train: attention 500 of 550 ns, the memset the rest");
    free(r);

    /* cut to the top rows */
    r = report(&p, NULL, 1);
    tap_ok(strstr(r, "(1 more kernels)") != NULL && strstr(r, "| round_kernel<...> | ours") == NULL,
           "top 1: the GEMM row, one more counted");
    free(r);
    kp_free(&p);

    /* no sections: the whole run, under the title given */
    kp_add(&p, "binary_kernel", 10, 20);
    kp_add(&p, "binary_kernel", 30, 40);
    r = report(&p, "db-train bf16", 5);
    tap_ok(strstr(r, "### kernel profile: db-train bf16\n") && strstr(r, "1 call; per call: 0.000 ms wall") &&
               strstr(r, "| binary_kernel | ours: elementwise and layout | 0.000 | 100.0% | 2.0 | 0.0 |"),
           "no sections: the whole run as one call");
    free(r);
    kp_free(&p);
    r = report(&p, NULL, 5);
    tap_ok(strstr(r, "whole run: no kernels recorded") != NULL, "nothing recorded: said so");
    free(r);

    /* idle stretches: gaps between records, overlaps merged (c runs over d's
     * start), reported longest first with the records around them */
    kp_begin(&p, "gaps", 0);
    kp_add(&p, "alpha_kernel", 0, 10000);
    kp_add(&p, "gamma_kernel", 55000, 100000);
    kp_add(&p, "beta_kernel", 50000, 60000);
    kp_add(&p, "delta_kernel", 130000, 140000);
    kp_add(&p, "eps_kernel", 145000, 150000); /* a 5 us gap: below the count's threshold */
    kp_end(&p, 150000, 1);
    r = report(&p, NULL, 5);
    tap_ok(strstr(r, "Idle stretches of 10 us or more: 2.0 per call, 0.070 ms per call in all") != NULL,
           "gaps: two of 10 us or more, 70 us in all");
    tap_ok(strstr(r, "| 1 | 40.0 | alpha_kernel | beta_kernel |\n| 2 | 30.0 | gamma_kernel | delta_kernel |\n"
                     "| 3 | 5.0 | delta_kernel | eps_kernel |") != NULL,
           "gaps: longest first, the overlap merged, the records around each");
    free(r);
    kp_free(&p);

    /* host calls: not GPU work, but the idle table names the ones covering
     * each stretch (the longest first) and the time no call covers */
    kp_begin(&p, "host", 0);
    kp_add(&p, "alpha_kernel", 0, 10000);
    kp_add_host(&p, "cudaGraphLaunch", 1000, 3000);           /* while the GPU ran: no stretch */
    kp_add_host(&p, "cudaStreamSynchronize", 12000, 30000);    /* 18 us of the 40 */
    kp_add_host(&p, "cudaMemcpy", 31000, 36000);               /* 5 us */
    kp_add_host(&p, "cudaStreamSynchronize", 38000, 42000);    /* 4 more */
    kp_add(&p, "beta_kernel", 50000, 60000);
    kp_end(&p, 60000, 1);
    r = report(&p, NULL, 5);
    tap_ok(strstr(r, "2 launches") != NULL || strstr(r, "2.0 launches") != NULL,
           "host calls are not counted as launches");
    tap_ok(strstr(r, "0.020 ms of GPU work") != NULL, "host calls are not GPU busy time");
    tap_ok(strstr(r, "| 1 | 40.0 | alpha_kernel | beta_kernel | cudaStreamSynchronize 22.0; cudaMemcpy 5.0; "
                     "no CUDA call 13.0 |") != NULL,
           "idle: the calls covering it by time, and the rest");
    tap_ok(strstr(r, "| cudaStreamSynchronize | 0.022 | 2.0 | 11.0 |\n| cudaMemcpy | 0.005 | 1.0 | 5.0 |\n"
                     "| cudaGraphLaunch | 0.002 | 1.0 | 2.0 |") != NULL,
           "the host calls' table, by time");
    free(r);
    kp_free(&p);

    /* an end without a begin is refused; an open section runs to the last record */
    tap_ok(kp_end(&p, 10, 1) == -1, "end without begin: -1");
    kp_begin(&p, "open", 0);
    kp_add(&p, "binary_kernel", 10, 20);
    r = report(&p, NULL, 5);
    tap_ok(strstr(r, "### kernel profile: open\n") && strstr(r, "| binary_kernel |"),
           "a section left open holds its records");
    free(r);
    kp_free(&p);

    /* many names: the hash table grows and keeps them apart */
    char nm[32];
    for (int i = 0; i < 3000; i++) {
        snprintf(nm, sizeof nm, "k%d", i % 1000);
        kp_add(&p, nm, (uint64_t)i, (uint64_t)i + 1);
    }
    tap_ok(p.nn == 1000 && p.nr == 3000 && p.lost == 0, "1000 names over 3000 records (%zu, %zu)", p.nn, p.nr);
    kp_free(&p);
    return tap_done();
}
