/* fuzz_llama2c.c - libFuzzer harness for the llama2.c model loader (runtime/format_llama2c.c).
 *
 * The input is a whole .bin file (v0, v1 or v2), loaded through the public tl_model_load. A file
 * the loader accepts must also run: one forward step reads every weight it handed out.
 */
#include <string.h>

#include "fuzz_common.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    tl_set_threads(1); /* no worker pool: one core, and a crash stack that is the harness's own */
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size >= 4 && memcmp(data, "GGUF", 4) == 0) return 0; /* the GGUF reader has its own harness */
    tl_model *model = fuzz_load_model(data, size);
    if (model == NULL) return 0;
    fuzz_forward(model, size);
    tl_model_free(model);
    return 0;
}
