from .deconvolution import Deconvolution
from .simulation import generate_simulated_data