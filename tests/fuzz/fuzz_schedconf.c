/* libFuzzer target: scheduler_config.json (with Python's NaN/Infinity) ->
 * every scheduler -> a few schedules -> every step on a small sample.
 * Anything accepted must build its tables and run without memory errors or
 * undefined behaviour; non-finite samples are allowed (diffusers makes them
 * too for odd but valid configs). */
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "libcommon/sd/sched.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    db_err e = {0};
    json_t *cfg = NULL;
    if (db_sched_config_parse((const char *)data, size, &cfg, &e) < 0)
        return 0;
    enum { N = 8 };
    static const int steps[] = {1, 3, 25};
    for (int k = 0; db_sched_names[k]; k++) {
        db_sched *s = NULL;
        if (db_sched_create(&s, db_sched_names[k], cfg, &e) < 0)
            continue;
        db_sched_set_eta(s, 1.0, &e);
        for (size_t q = 0; q < sizeof steps / sizeof steps[0]; q++) {
            if (db_sched_set_timesteps(s, steps[q], &e) < 0)
                continue;
            float x[N], mo[N], z[N], px[N], in[N];
            for (int j = 0; j < N; j++) {
                x[j] = (float)(j - 3) * db_sched_init_noise_sigma(s);
                mo[j] = (float)(j % 3) - 1.0f;
                z[j] = (float)(j & 1) - 0.5f;
            }
            for (int i = 0; i < db_sched_nsteps(s); i++) {
                (void)db_sched_timestep(s, i);
                db_sched_scale_model_input(s, i, in, x, N);
                if (db_sched_step(s, i, mo, x, N, z, px, &e) < 0)
                    __builtin_trap(); /* a valid schedule's steps in order never fail */
            }
        }
        float out[N] = {0}, x0[N] = {0}, nz[N] = {0};
        db_sched_add_noise(s, out, x0, nz, N, db_sched_num_train_timesteps(s) - 1, &e);
        db_sched_velocity(s, out, x0, nz, N, 0, &e);
        db_sched_free(s);
    }
    json_decref(cfg);
    return 0;
}
