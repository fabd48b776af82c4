// _runtime.cpp - pybind11 binding over runtime/tinyllm.h. Thin on purpose: one Python class per C
// handle, errors turned into tinyllm.errors exceptions, the GIL released while computing.
// Everything user-facing (defaults, stop strings, streaming) lives in tinyllm/runtime.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

extern "C" {
#include "tinyllm.h"
/* kernels.h's path selection (the rest of that header is the kernels themselves) */
int tl_kernels_select(const char *name);
int tl_kernels_active(void);
const char *tl_kernels_name(int kernels);
int tl_kernels_float(int kernels);
}

namespace py = pybind11;

// Raise the tinyllm.errors class that matches a C status, with tl_last_error() as the message.
// mismatch: the class of TL_ERR_MISMATCH, which is about a tokenizer except where an adapter is loaded.
static void check(tl_status st, const char *mismatch = "TokenizerError") {
    if (st == TL_OK) return;
    const char *name = "TinyLLMError";
    switch (st) {
        case TL_ERR_IO: name = "FileError"; break;
        case TL_ERR_FORMAT: name = "FormatError"; break;
        case TL_ERR_ARGUMENT: name = "InvalidArgumentError"; break;
        case TL_ERR_RANGE: name = "ContextLengthError"; break;
        case TL_ERR_MISMATCH: name = mismatch; break;
        default: break;
    }
    std::string message = tl_last_error();
    py::object cls = py::module_::import("tinyllm.errors").attr(name);
    PyErr_SetString(cls.ptr(), message.c_str());
    throw py::error_already_set();
}

// A bad argument the binding itself finds, raised like the C API's TL_ERR_ARGUMENT.
static void argument_error(const std::string &message) {
    py::object cls = py::module_::import("tinyllm.errors").attr("InvalidArgumentError");
    PyErr_SetString(cls.ptr(), message.c_str());
    throw py::error_already_set();
}

struct Model {
    tl_model *ptr = nullptr;
    explicit Model(const std::string &path) { check(tl_model_load(path.c_str(), &ptr)); }
    ~Model() { tl_model_free(ptr); }
    // Apply a GGUF LoRA adapter; an adapter for another model is a FormatError.
    void add_adapter(const std::string &path, float scale) {
        check(tl_model_add_adapter(ptr, path.c_str(), scale), "FormatError");
    }
    py::dict config() const {
        tl_config c;
        tl_model_config(ptr, &c);
        py::dict d;
        d["dim"] = c.dim; d["hidden_dim"] = c.hidden_dim; d["n_layers"] = c.n_layers;
        d["n_heads"] = c.n_heads; d["n_kv_heads"] = c.n_kv_heads; d["vocab_size"] = c.vocab_size;
        d["seq_len"] = c.seq_len; d["shared_classifier"] = c.shared_classifier != 0;
        d["rope_theta"] = c.rope_theta; d["norm_eps"] = c.norm_eps;
        static const char *types[] = {"f32", "q8", "f16", "q8_0", "q4_0"};
        d["weight_type"] = c.weight_type >= 0 && c.weight_type <= TL_TYPE_Q4_0 ? types[c.weight_type] : "?";
        d["group_size"] = c.group_size; d["file_version"] = c.file_version;
        d["file_format"] = c.file_format == TL_FORMAT_GGUF ? "gguf" : "llama2c";
        d["n_experts"] = c.n_experts; d["n_experts_active"] = c.n_experts_active;
        return d;
    }
};

struct Tokenizer {
    tl_tokenizer *ptr = nullptr;
    Tokenizer(const std::string &path, int vocab_size) { check(tl_tokenizer_load(path.c_str(), vocab_size, &ptr)); }
    explicit Tokenizer(tl_tokenizer *t) : ptr(t) {}
    // The tokenizer stored in a model file (GGUF).
    static Tokenizer *from_model(const Model &m) {
        tl_tokenizer *t = nullptr;
        check(tl_tokenizer_from_model(m.ptr, &t));
        return new Tokenizer(t);
    }
    ~Tokenizer() { tl_tokenizer_free(ptr); }
    // special=false: user-defined pieces (the chat template's role tokens) are plain text
    std::vector<int> encode(const py::bytes &text, bool bos, bool eos, bool special) const {
        std::string s = text;
        std::vector<int> ids(s.size() + 3);  // BPE never yields more ids than bytes (+ BOS/EOS)
        int n = 0;
        auto encode = special ? tl_tokenizer_encode : tl_tokenizer_encode_plain;
        check(encode(ptr, s.data(), s.size(), bos, eos, ids.data(), (int)ids.size(), &n));
        ids.resize(n);
        return ids;
    }
    py::bytes decode(const std::vector<int> &ids) const {
        std::vector<char> buf(16 * ids.size() + 16);
        size_t len = 0;
        tl_status st;
        while ((st = tl_tokenizer_decode(ptr, ids.data(), (int)ids.size(), buf.data(), buf.size(), &len)) ==
               TL_ERR_RANGE)
            buf.resize(buf.size() * 4);
        check(st);
        return py::bytes(buf.data(), len);
    }
    int vocab_size() const { return tl_tokenizer_vocab_size(ptr); }
    int bos() const { return tl_tokenizer_bos(ptr); }
    int eos() const { return tl_tokenizer_eos(ptr); }
    int piece_id(const std::string &piece) const { return tl_tokenizer_piece_id(ptr, piece.c_str()); }
};

struct Session {
    py::object model_ref;  // keeps the Model alive while the session uses its weights
    tl_session *ptr = nullptr;
    int vocab_size;
    Session(py::object model, int n_ctx, bool kv_f16) : model_ref(model) {
        Model &m = model.cast<Model &>();
        tl_config c;
        tl_model_config(m.ptr, &c);
        vocab_size = c.vocab_size;
        const tl_session_params params = {n_ctx, kv_f16 ? 1 : 0};
        check(tl_session_new_ex(m.ptr, &params, &ptr));
    }
    ~Session() { tl_session_free(ptr); }
    // Logits of every fed position (n, vocab) when all_logits, else of the last one (vocab,).
    py::array_t<float> feed(const std::vector<int> &tokens, bool all_logits) {
        const size_t rows = all_logits ? tokens.size() : 1;
        // shapes as py::ssize_t vectors: a braced list of size_t is a narrowing error for clang++
        py::array_t<float> out = all_logits
            ? py::array_t<float>(std::vector<py::ssize_t>{(py::ssize_t)rows, (py::ssize_t)vocab_size})
            : py::array_t<float>(std::vector<py::ssize_t>{(py::ssize_t)vocab_size});
        float *dst = out.mutable_data();
        tl_status st;
        {
            py::gil_scoped_release nogil;
            st = tl_session_feed(ptr, tokens.data(), (int)tokens.size(), dst, all_logits);
        }
        check(st);
        return out;
    }
    int pos() const { return tl_session_pos(ptr); }
    int n_ctx() const { return tl_session_n_ctx(ptr); }
    void rewind(int pos) { check(tl_session_rewind(ptr, pos)); }
};

// One forward step over several sessions of a model (tl_batch_step): the scratch of the batch lives
// here, so that a steady batch allocates nothing per step.
struct Batch {
    py::object model_ref;
    tl_batch *ptr = nullptr;
    int vocab_size;
    explicit Batch(py::object model) : model_ref(model) {
        Model &m = model.cast<Model &>();
        tl_config c;
        tl_model_config(m.ptr, &c);
        vocab_size = c.vocab_size;
        check(tl_batch_new(m.ptr, &ptr));
    }
    ~Batch() { tl_batch_free(ptr); }
    // tokens[i]: an int (one token, decoding) or a list of ints (a chunk of a prompt) for sessions[i].
    // Returns (n, vocab) logits, row i for the last token of sessions[i].
    py::array_t<float> step(const py::list &sessions, const py::list &tokens) {
        if (sessions.size() != tokens.size())
            argument_error(std::to_string(sessions.size()) + " sessions but " + std::to_string(tokens.size()) +
                           " token entries");
        std::vector<tl_session *> ptrs;
        std::vector<int> ids, counts;
        for (const py::handle &s : sessions) {
            if (!py::isinstance<Session>(s)) throw py::type_error("sessions must be Session objects");
            ptrs.push_back(s.cast<Session &>().ptr);
        }
        for (const py::handle &t : tokens) {
            try {
                if (py::isinstance<py::int_>(t)) {
                    ids.push_back(t.cast<int>());
                    counts.push_back(1);
                } else {
                    if (py::isinstance<py::str>(t) || py::isinstance<py::bytes>(t)) throw py::cast_error();
                    std::vector<int> chunk = t.cast<std::vector<int>>();
                    ids.insert(ids.end(), chunk.begin(), chunk.end());
                    counts.push_back((int)chunk.size());
                }
            } catch (const py::cast_error &) {
                throw py::type_error("each entry of tokens must be a token id or a list of token ids");
            }
        }
        const size_t n = ptrs.size();
        py::array_t<float> out({n, (size_t)vocab_size});
        float *dst = out.mutable_data();
        tl_status st;
        {
            py::gil_scoped_release nogil;
            st = tl_batch_step(ptr, ptrs.data(), ids.data(), counts.data(), (int)n, dst);
        }
        check(st);
        return out;
    }
};

struct Generator {
    py::object session_ref, tokenizer_ref;
    tl_generator *ptr = nullptr;
    Generator(py::object session, py::object tokenizer, float temperature, float top_p, int top_k,
              unsigned long long seed, float repetition_penalty, int repetition_window, int no_repeat_ngram)
        : session_ref(session), tokenizer_ref(tokenizer) {
        tl_sample_params p = {temperature, top_p, top_k, seed, repetition_penalty, repetition_window,
                              no_repeat_ngram};
        check(tl_generator_new(session.cast<Session &>().ptr, tokenizer.cast<Tokenizer &>().ptr, &p, &ptr));
    }
    ~Generator() { tl_generator_free(ptr); }
    void prompt(const py::bytes &text, bool add_bos) {
        std::string s = text;
        tl_status st;
        {
            py::gil_scoped_release nogil;
            st = tl_generator_prompt(ptr, s.data(), s.size(), add_bos);
        }
        check(st);
    }
    void prompt_ids(const std::vector<int> &ids) {
        tl_status st;
        {
            py::gil_scoped_release nogil;
            st = tl_generator_prompt_ids(ptr, ids.data(), (int)ids.size());
        }
        check(st);
    }
    void chat_turn(const std::string &system, const std::string &user) {
        tl_status st;
        {
            py::gil_scoped_release nogil;
            st = tl_generator_chat_turn(ptr, system.c_str(), user.c_str());
        }
        check(st);
    }
    // (token, newly complete UTF-8 bytes, done)
    py::tuple next() {
        int token = -1, done = 0;
        const char *text = nullptr;
        size_t len = 0;
        tl_status st;
        {
            py::gil_scoped_release nogil;
            st = tl_generator_next(ptr, &token, &text, &len, &done);
        }
        check(st);
        return py::make_tuple(token, py::bytes(text, len), done != 0);
    }
    // tl_generator_next in two halves, for a session a Batch feeds: (token, text bytes, done), nothing fed
    py::tuple sample() {
        int token = -1, done = 0;
        const char *text = nullptr;
        size_t len = 0;
        tl_status st;
        {
            py::gil_scoped_release nogil;  // softmax and top-p over the vocabulary: the event loop may run
            st = tl_generator_sample(ptr, &token, &text, &len, &done);
        }
        check(st);
        return py::make_tuple(token, py::bytes(text, len), done != 0);
    }
    // ids that a Batch step fed to the session, and its logits row for the last of them
    void fed(const std::vector<int> &ids, py::array_t<float, py::array::c_style | py::array::forcecast> logits) {
        const int vocab = session_ref.cast<Session &>().vocab_size;
        if (logits.ndim() != 1 || logits.shape(0) != vocab)
            argument_error("logits of " + std::to_string(logits.size()) + " floats, the vocabulary is " +
                           std::to_string(vocab));
        check(tl_generator_fed(ptr, ids.data(), (int)ids.size(), logits.data()));
    }
    std::vector<int> context() const {
        int n = 0;
        const int *ids = tl_generator_context(ptr, &n);
        return std::vector<int>(ids, ids + n);
    }
    py::bytes flush() {
        size_t len = 0;
        const char *text = tl_generator_flush(ptr, &len);
        return py::bytes(text, len);
    }
};

PYBIND11_MODULE(_runtime, m) {
    m.doc() = "Low-level binding of the tinyllm C runtime; use tinyllm.Runtime instead.";
    m.def("set_threads", &tl_set_threads, "Threads for the matmuls (<= 0: physical cores).");
    m.def("get_threads", &tl_get_threads);
    m.def("kernels", [] { return std::string(tl_kernels_name(tl_kernels_active())); },
          "The kernel path the matmuls take: TINYLLM_KERNELS when this CPU has it, else the default.");
    m.def("float_kernels", [] { return std::string(tl_kernels_name(tl_kernels_float(tl_kernels_active()))); },
          "The float-activation path behind the active one (the active one if it is a float path).");
    m.def("select_kernels", [](const std::string &name) { return std::string(tl_kernels_name(tl_kernels_select(name.c_str()))); },
          py::arg("name"), "Take the path of that name for this process (\"\" or unknown: the default); returns the path taken.");
    py::class_<Model>(m, "Model")
        .def(py::init<const std::string &>())
        .def("add_adapter", &Model::add_adapter, py::arg("path"), py::arg("scale") = 1.0f)
        .def("config", &Model::config);
    py::class_<Tokenizer>(m, "Tokenizer")
        .def(py::init<const std::string &, int>())
        .def_static("from_model", &Tokenizer::from_model)
        .def("encode", &Tokenizer::encode, py::arg("text"), py::arg("bos"), py::arg("eos"),
             py::arg("special") = true)
        .def("decode", &Tokenizer::decode)
        .def_property_readonly("vocab_size", &Tokenizer::vocab_size)
        .def_property_readonly("bos_id", &Tokenizer::bos)
        .def_property_readonly("eos_id", &Tokenizer::eos)
        .def("piece_id", &Tokenizer::piece_id);
    py::class_<Session>(m, "Session")
        .def(py::init<py::object, int, bool>(), py::arg("model"), py::arg("n_ctx"), py::arg("kv_f16") = false)
        .def("feed", &Session::feed, py::arg("tokens"), py::arg("all_logits") = false)
        .def_property_readonly("pos", &Session::pos)
        .def_property_readonly("n_ctx", &Session::n_ctx)
        .def("rewind", &Session::rewind);
    py::class_<Batch>(m, "Batch")
        .def(py::init<py::object>())
        .def("step", &Batch::step, py::arg("sessions"), py::arg("tokens"),
             "One forward step: tokens[i] (an int, or a list for a prompt chunk) after sessions[i]'s cache; "
             "(n, vocab) logits of each session's last token.");
    py::class_<Generator>(m, "Generator")
        .def(py::init<py::object, py::object, float, float, int, unsigned long long, float, int, int>())
        .def("prompt", &Generator::prompt)
        .def("prompt_ids", &Generator::prompt_ids)
        .def("chat_turn", &Generator::chat_turn)
        .def("next", &Generator::next)
        .def("sample", &Generator::sample)
        .def("fed", &Generator::fed, py::arg("ids"), py::arg("logits"))
        .def("flush", &Generator::flush)
        .def("context", &Generator::context);
    m.def("default_tokenizer_path", [](const std::string &model_path, int vocab_size) {
        char buf[4096];
        tl_default_tokenizer_path(model_path.c_str(), vocab_size, buf, sizeof(buf));
        return std::string(buf);
    });
}
