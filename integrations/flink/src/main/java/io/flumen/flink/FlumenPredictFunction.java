package io.flumen.flink;

import java.util.Collection;

import org.apache.flink.table.data.RowData;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.PredictFunction;

/** {@code ML_PREDICT}'s sync function for a {@code flumen} model ({@code 'async' = 'false'}). */
public final class FlumenPredictFunction extends PredictFunction {
    private static final long serialVersionUID = 1L;
    private final Settings settings;
    private final Rows rows;
    private transient Client client;

    FlumenPredictFunction(Settings settings, Rows rows) {
        this.settings = settings;
        this.rows = rows;
    }

    @Override
    public void open(FunctionContext context) {
        client = new Client(settings);
    }

    @Override
    public Collection<RowData> predict(RowData input) {
        return FlumenModelProvider.outcome(settings, rows, client.post(rows.body(input)).join());
    }
}
