/* model.h - the model's internal structs, shared by the format readers and the forward pass. */
#ifndef TINYLLM_MODEL_H
#define TINYLLM_MODEL_H

#include "internal.h"
#include "kernels.h"

/* A LoRA delta on one weight matrix W (rows x cols): W x becomes W x + factor * B (A x). A (rank x cols)
 * and B (rows x rank) are views into the adapter's mapping; the deltas of several adapters on one
 * matrix form a list. */
typedef struct tl_lora {
    tl_matrix a, b;
    float factor;          /* the caller's scale * alpha / rank */
    struct tl_lora *next;
} tl_lora;

/* The per-layer matrices an adapter may change, in tl_layer's order (lora.c names them). */
enum { TL_WQ, TL_WK, TL_WV, TL_WO, TL_W1, TL_W2, TL_W3, TL_LAYER_MATRICES };

/* Experts a mixture-of-experts layer may have. python/tinyllm/config.py MAX_EXPERTS is the same number:
 * change both together. Far beyond tiny models; it bounds the routing scratch of a token. */
#define TL_MAX_EXPERTS 256

/* One expert of a mixture-of-experts layer: a SwiGLU feed-forward whose matrices are views into the
 * layer's 3-D expert tensors (GGUF ffn_{gate,down,up}_exps, one contiguous rows x cols slice each). */
typedef struct {
    tl_matrix w1, w2, w3;     /* (hidden,dim) (dim,hidden) (hidden,dim) */
} tl_expert;

typedef struct {
    const float *rms_att;   /* (dim) attention RMSNorm weight */
    const float *rms_ffn;   /* (dim) FFN RMSNorm weight */
    tl_matrix wq, wk, wv, wo; /* (dim,dim) (kv_dim,dim) (kv_dim,dim) (dim,dim) */
    tl_matrix w1, w2, w3;     /* (hidden,dim) (dim,hidden) (hidden,dim); unused (rows 0) in an MoE layer */
    tl_matrix router;         /* MoE: (n_experts, dim), the router's logits per expert */
    tl_expert *experts;       /* MoE: n_experts (into tl_model.experts); NULL in a dense layer */
    tl_lora *lora[TL_LAYER_MATRICES]; /* LoRA deltas on wq .. w3 (NULL: none) */
} tl_layer;

/* An adapter file applied to a model (lora.c): its mapping and the deltas that point into it. */
typedef struct tl_adapter {
    tl_mapped_file file;
    tl_lora *deltas;          /* n_deltas, linked into the layers' lists */
    int n_deltas;
    struct tl_adapter *next;
} tl_adapter;

/* A tokenizer stored in the model file (GGUF tokenizer.ggml.*): views into the mapping, all
 * lengths validated by the reader. n == 0 when the file holds none. */
typedef struct {
    int n;                        /* pieces */
    const unsigned char *tokens;  /* n strings, each uint64 length + UTF-8 bytes (U+2581 for spaces) */
    const unsigned char *scores;  /* n float32, or NULL */
    const unsigned char *types;   /* n int32 (SentencePiece type numbering), or NULL */
    int bos, eos, unk;            /* -1 when not given */
    int add_space_prefix;         /* SentencePiece's add_dummy_prefix */
    int remove_extra_whitespaces;
} tl_embedded_vocab;

struct tl_model {
    tl_config config;
    tl_mapped_file file;      /* the weights point into this mapping */
    tl_matrix token_embedding; /* (vocab, dim) */
    tl_matrix classifier;      /* (vocab, dim); the embedding when shared */
    const float *rms_final;    /* (dim) */
    tl_layer *layers;          /* n_layers */
    tl_expert *experts;        /* n_layers x n_experts views for MoE models (layer l's at l * n_experts), else NULL */
    double *rope_freq;         /* (head_dim/2) theta^(-2i/head_dim); sessions turn it into cos/sin per step */
    float *owned;              /* weights a reader converted (e.g. f16 norms to f32), freed with the model */
    tl_embedded_vocab vocab;
    tl_adapter *adapters;      /* LoRA adapters applied (tl_model_add_adapter), newest first */
};

/* Check hyper-parameters read from a file; fills a message naming the bad field. The Python readers
 * apply the same rules (ModelConfig.validate in python/tinyllm/config.py): change them together. */
tl_status tl_config_validate(const tl_config *c, const char *path);

/* The model a session runs. */
const tl_model *tl_session_model(const tl_session *s);

/* Readers: fill model from the mapped file (model->file already set). */
tl_status tl_load_llama2c(tl_model *model, const char *path);
tl_status tl_load_gguf(tl_model *model, const char *path);
/* The file starts with GGUF's magic. */
int tl_is_gguf(const tl_mapped_file *f);

/* ---- LoRA adapters (lora.c) ------------------------------------------------------------------- */

/* A string of a GGUF file: a view into the mapping (not NUL-terminated); data NULL when absent. */
typedef struct {
    const char *data;
    size_t len;
} tl_gguf_string;

/* One tensor of a GGUF file, its data checked to lie inside the file. */
typedef struct {
    tl_gguf_string name;
    int n_dims;
    uint64_t ne[4];    /* extents, ne[0] the row length; 1 beyond n_dims */
    int type;          /* tl_type: F32, F16, Q8_0 or Q4_0 (the parser refuses the others) */
    const void *data;
} tl_gguf_tensor;

/* What an adapter needs of a GGUF file, read by format_gguf.c under a model's checks. */
typedef struct {
    tl_gguf_string general_type, architecture, adapter_type;
    int has_alpha;
    float alpha;             /* adapter.lora.alpha (F32 or F64) */
    tl_gguf_tensor *tensors; /* n_tensors, malloc'ed: free it */
    uint64_t n_tensors;
} tl_gguf_adapter;

tl_status tl_read_gguf_adapter(const tl_mapped_file *f, const char *path, tl_gguf_adapter *out);

/* out (rows x d->b.rows, row t at out + t * d->b.rows) += every delta of the list's factor * B (A x) for the
 * rows of x (rows x d->a.cols); mid holds rows x rank floats, tmp rows x b.rows, for the largest of the list. */
void tl_lora_apply(const tl_lora *d, float *out, const float *x, int rows, float *mid, float *tmp);
/* Unmap and free every adapter of the model. */
void tl_adapters_free(tl_model *model);

#endif
