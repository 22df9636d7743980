# Stand-in for LAPA's laq_model package (interface per shared LAQ_INTERFACE.md): like the
# published package, importing it pulls in the trainer and so wandb / accelerate / ema-pytorch.
from laq_model.laq_trainer import LAQTrainer
from laq_model.latent_action_quantization import LatentActionQuantization
