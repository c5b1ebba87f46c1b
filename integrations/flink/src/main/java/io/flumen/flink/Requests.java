package io.flumen.flink;

/**
 * A protocol's request for one text record, and where its answer keeps the
 * prediction: shared by the SQL provider ({@link Rows}) and the DataStream function.
 */
final class Requests {
    private Requests() {}

    /**
     * The body for one text: OpenAI embeddings or chat, or a KServe v2 tensor row of
     * one BYTES element (for KServe rows of other types, see {@link Rows}).
     */
    static String text(Settings settings, String text) {
        StringBuilder b = new StringBuilder();
        switch (settings.protocol) {
            case OPENAI_EMBEDDINGS:
                b.append("{\"model\":");
                Json.string(b, settings.model);
                b.append(",\"input\":[");
                Json.string(b, text);
                return b.append("]}").toString();
            case OPENAI_CHAT:
                b.append("{\"model\":");
                Json.string(b, settings.model);
                b.append(",\"messages\":[{\"role\":\"user\",\"content\":");
                Json.string(b, text);
                return b.append("}]}").toString();
            default:
                b.append("{\"inputs\":[{\"name\":");
                Json.string(b, settings.kserveInput);
                b.append(",\"shape\":[1,1],\"datatype\":\"BYTES\",\"data\":[");
                Json.string(b, text);
                return b.append("]}]}").toString();
        }
    }

    /**
     * The prediction in an answer: the embedding (a list of numbers), the chat
     * message's content (a string), or the first KServe output's {@code data} (a list).
     */
    static Object prediction(Settings settings, Object json) {
        switch (settings.protocol) {
            case OPENAI_EMBEDDINGS:
                return Json.get(Json.at(Json.get(json, "data"), 0), "embedding");
            case OPENAI_CHAT:
                return Json.get(Json.get(Json.at(Json.get(json, "choices"), 0), "message"), "content");
            default:
                return Json.get(Json.at(Json.get(json, "outputs"), 0), "data");
        }
    }
}
