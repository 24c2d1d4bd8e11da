-- Which vectors each collection holds: the model (the fp32 file it comes from) and its precision,
-- as `resnet50.onnx@int8`. Written by the first run that embeds into the collection; every later
-- run, search pod and the operator check it, so vectors of different models or precisions never mix.
CREATE TABLE IF NOT EXISTS collections (
    collection VARCHAR(255) NOT NULL PRIMARY KEY,
    model      VARCHAR(255) NOT NULL,
    created_at DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
